"""Every method searched in exactly its own variables, on the micro pool, merged in process.

For each method a search can vary: the trial's Optuna parameters are the space's
variables and nothing else; each variable changes the merge (the method reads it); a
trial's stored values (its `weights` and `tuned:*` attributes) rebuild a recipe that merges
to the same tensors as the trial's own; its baselines are distinct merges. Coupled ranges
(della's density ± epsilon) are legal at every sampled point.
"""

from __future__ import annotations

import html
import io
import itertools
import random
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

from recycler.commands.export import card_extra
from recycler.commands.front import front_as_dict, render_csv, render_table
from recycler.config import StudySpec, load_study_spec
from recycler.errors import RecyclerError
from recycler.export.card import model_card
from recycler.merge.description import MergeInputs
from recycler.merge.engine import merge_state_dict
from recycler.merge.methods import METHODS
from recycler.merge.recipe import Recipe
from recycler.pool import Pool
from recycler.report import write_report
from recycler.search.analysis import analyse, format_recipe
from recycler.search.baselines import BASE, DEFAULTS, baseline_trials
from recycler.search.space import SearchSpace
from recycler.search.stored import (
    Objective,
    TrialWriter,
    queued_attrs,
    read_trial,
    view_of,
    write_identity,
)

# Fisher merging needs fisher.safetensors beside each checkpoint (tests/test_fisher.py).
SEARCHABLE = [m for m in METHODS.values() if m.searchable and not m.needs_fishers]
NOTHING_TO_SEARCH = [m.name for m in METHODS.values() if not m.searchable]


def _study(root: Path, zoo: Path, method: str, **search: Any) -> tuple[StudySpec, Pool]:
    """A study over the micro pool with as many checkpoints as `method` takes (up to 3)."""
    description = METHODS[method]
    with_base = bool(search.pop("base", description.uses_base))
    low, high = description.model_range(with_base)
    checkpoints = sorted(str(p) for p in (zoo / "checkpoints").iterdir())
    count = min(max(low, 3), high or 3)
    data = {
        "name": f"m-{method}",
        "pool": {
            "base": str(zoo / "base") if with_base else None,
            "checkpoints": checkpoints[:count],
        },
        "merge": {"method": method, "dtype": "float32"},
        "search": {"tune": list(description.tunable), "n_trials": 20, **search},
        "eval": {"tasks_dir": str(zoo / "tasks")},
        "objectives": [{"name": "inc", "task": "zoo_inc", "metric": "acc"}],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.yaml").write_text(yaml.safe_dump(data))
    spec = load_study_spec(root / "study.yaml")
    pool = Pool.open(spec.pool.checkpoints, spec.base_path)
    return spec, pool


def _merge(pool: Pool, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    return merge_state_dict(pool, Recipe.from_dict(recipe))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _moved(value: float, low: float, high: float) -> float:
    """Another value of [low, high], far from `value`."""
    other = low + 0.2 * (high - low)
    return other if abs(other - value) > 0.3 * (high - low) else low + 0.8 * (high - low)


@pytest.mark.parametrize(
    ("method", "search"),
    [
        *((m.name, {}) for m in SEARCHABLE),
        ("slerp", {"granularity": "layers:2"}),  # t per group of layers
        ("slerp", {"base": False}),  # t = 0 is the first checkpoint
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_a_search_varies_exactly_what_the_method_reads(
    micro_zoo: Path, tmp_path: Path, method: str, search: dict[str, Any]
) -> None:
    spec, pool = _study(tmp_path, micro_zoo, method, **search)
    space = SearchSpace.from_pool(spec, pool)
    baselines, _ = baseline_trials(space, pool.checkpoints, spec.search.enqueued_baselines)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _, params in baselines:
        study.enqueue_trial(params)
    merges: list[dict[str, torch.Tensor]] = []
    for _ in range(len(baselines) + 1):
        trial = study.ask()
        proposal = space.suggest(trial)
        assert set(trial.params) == set(space.param_names())
        TrialWriter.of(trial).proposal(space.weights_by_checkpoint(proposal), proposal.tuned)
        recipe = space.recipe_dict(proposal)
        merges.append(_merge(pool, recipe))
        study.tell(trial, 0.0)
        # What the trial stored rebuilds the merge it made, tensor for tensor.
        record = read_trial(study.trials[trial.number])
        assert bool(record.weights) == METHODS[method].weighted
        assert set(record.tuned) == {t.name for t in spec.search.tune}
        stored = space.recipe_dict(space.stored_proposal(record.weights, record.tuned))
        assert _same(_merge(pool, stored), merges[-1])
    labels = [label for label, _ in baselines]
    assert labels, "every searchable method has a baseline"
    for (i, a), (j, b) in itertools.combinations(enumerate(merges[: len(baselines)]), 2):
        assert not _same(a, b), f"baselines {labels[i]} and {labels[j]} are the same merge"
    # Each variable the search samples changes the merge: the method reads it.
    searched = study.trials[-1]
    assert searched.state == optuna.trial.TrialState.COMPLETE
    last = dict(searched.params)
    for key, distribution in searched.distributions.items():
        assert isinstance(distribution, optuna.distributions.FloatDistribution)
        moved = {**last, key: _moved(last[key], distribution.low, distribution.high)}
        assert not _same(_merge(pool, space.recipe_dict(space.decode(moved))), merges[-1]), (
            f"{method}: {key} does not change the merge"
        )


def test_slerp_singles_are_its_endpoints(micro_zoo: Path, tmp_path: Path) -> None:
    spec, pool = _study(tmp_path / "a", micro_zoo, "slerp")
    space = SearchSpace.from_pool(spec, pool)
    baselines, notes = baseline_trials(space, pool.checkpoints, ["uniform", "singles", "mwa_loss"])
    name = pool.checkpoints[0].name
    assert [label for label, _ in baselines] == [DEFAULTS, BASE, f"single:{name}"]
    assert [space.decode(p).tuned["t"] for _, p in baselines] == [0.5, 0.0, 1.0]
    assert "baseline mwa_loss skipped: slerp reads no weights" in notes
    base_merge = _merge(pool, space.recipe_dict(space.decode(baselines[1][1])))
    model_merge = _merge(pool, space.recipe_dict(space.decode(baselines[2][1])))
    for tensor in pool.tensor_names:
        assert torch.equal(base_merge[tensor], pool.base.read(tensor).float())  # type: ignore[union-attr]
        torch.testing.assert_close(model_merge[tensor], pool.checkpoints[0].read(tensor).float())
    # A range without the endpoints has no such baselines.
    spec, pool = _study(tmp_path / "b", micro_zoo, "slerp", tune=[{"t": [0.2, 0.8]}])
    baselines, notes = baseline_trials(
        SearchSpace.from_pool(spec, pool), pool.checkpoints, ["uniform", "singles"]
    )
    assert [label for label, _ in baselines] == [DEFAULTS]
    assert any("baseline base skipped: its values are outside" in n for n in notes)


def test_a_baseline_that_repeats_another_merge_is_skipped(micro_zoo: Path, tmp_path: Path) -> None:
    # One checkpoint: its single is the uniform soup.
    spec, pool = _study(tmp_path, micro_zoo, "task_arithmetic")
    spec = spec.model_copy(update={"pool": spec.pool.model_copy(update={"checkpoints": []})})
    space = SearchSpace(spec, ["a"], [str(pool.checkpoints[0].path)], str(pool.base.path), [])  # type: ignore[union-attr]
    baselines, notes = baseline_trials(space, pool.checkpoints[:1], ["uniform", "singles"])
    assert [label for label, _ in baselines] == ["uniform"]
    assert notes == ["baseline single:a skipped: the same merge as uniform"]


@pytest.mark.parametrize("method", NOTHING_TO_SEARCH)
def test_a_method_with_nothing_to_search_is_refused(
    micro_zoo: Path, tmp_path: Path, method: str
) -> None:
    with pytest.raises(RecyclerError, match=rf"merge.method: {method} has nothing to search"):
        _study(tmp_path, micro_zoo, method)


@pytest.mark.parametrize("method", [m.name for m in SEARCHABLE])
def test_default_ranges_are_legal_everywhere(method: str) -> None:
    """Thousands of points of the method's default ranges pass the recipe's checks, and
    merged on small random tensors none is refused (della's density ± epsilon stays inside
    (0, 1): `Coupling`)."""
    description = METHODS[method]
    n = min(max(description.model_range(description.uses_base)[0], 2), 3)
    n = min(n, description.model_range(description.uses_base)[1] or n)
    names = [f"c{i}" for i in range(n)]
    data = {
        "name": "p",
        "pool": {"base": "base" if description.uses_base else None, "checkpoints": names},
        "merge": {"method": method},
        "search": {"tune": list(description.tunable)},
        "eval": {"tasks_dir": "."},
        "objectives": [{"name": "a", "task": "t", "metric": "acc"}],
    }
    spec = StudySpec.model_validate(data)
    base_path = "/base" if description.uses_base else None
    space = SearchSpace(spec, names, [f"/{c}" for c in names], base_path, ["w"])
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 4, generator=gen)
    versions = [base + 0.1 * torch.randn(4, 4, generator=gen) for _ in range(n)]
    rng = random.Random(0)
    # Uniform points of the box a sampler searches, its corners included.
    box = {v.key: (v.low, v.high) for v in space.variables}
    box.update({key: (0.0, 1.0) for key in space.param_names() if key not in box})  # weights
    corners = [
        {key: ends[(i >> j) & 1] for j, (key, ends) in enumerate(box.items())}
        for i in range(2 ** len(box))
    ]
    uniform = [{key: rng.uniform(*ends) for key, ends in box.items()} for _ in range(2000)]
    for i, point in enumerate(corners + uniform):
        proposal = space.decode(point)
        recipe = Recipe.from_dict(space.recipe_dict(proposal))  # the recipe checks pass
        if i >= len(corners) and i % 8:
            continue  # della draws a 2^20-entry block of masks per tensor: merge every 8th
        params = recipe.tensor_params("w", 1)
        ones = [1.0] * len(versions)
        description.fn(  # as the engine calls it (engine.merge_tensor)
            MergeInputs(
                versions=versions,
                weights=params.per_model.get("weight", ones),
                base=base if description.uses_base else None,
                out_dtype=torch.float32,
                normalize=recipe.normalize,
                lambda_=params.lambda_,
                densities=params.per_model.get("density", ones),
                seed_key=f"{rng.random()}:w",
                params=params,
            )
        )


def test_front_report_and_card_show_each_trials_tuned_values(
    micro_zoo: Path, tmp_path: Path
) -> None:
    """slerp with t per group of layers: every place a trial's scores are shown names its t."""
    spec, pool = _study(tmp_path, micro_zoo, "slerp", granularity="layers:2")
    space = SearchSpace.from_pool(spec, pool)
    study = optuna.create_study(direction="maximize")
    write_identity(study, [Objective("inc", "zoo_inc", "acc", True)], space.fingerprint())
    baselines, _ = baseline_trials(space, pool.checkpoints, spec.search.enqueued_baselines)
    for label, params in baselines:
        study.enqueue_trial(params, user_attrs=queued_attrs(params, baseline=label))
    for _ in range(len(baselines) + 2):
        trial = study.ask()
        proposal = space.suggest(trial)
        writer = TrialWriter.of(trial)
        writer.proposal(space.weights_by_checkpoint(proposal), proposal.tuned)
        writer.recipe(space.recipe_dict(proposal))
        # A score that orders the trials by their t (what is shown is the point here).
        value = sum(proposal.tuned["t"].values())  # type: ignore[union-attr]
        writer.scores({"zoo_inc": {"acc,none": value}}, {"inc": value})
        study.tell(trial, value)
    summary = analyse(view_of(study), "dev")
    best = summary.members[0].record
    t = best.tuned["t"]
    shown = "t=" + "/".join(f"{v:.3g}" for v in t.values())
    assert shown in format_recipe(best) and "=" not in format_recipe(best).replace(shown, "")
    table = io.StringIO()
    render_table(summary, spec, file=table)
    assert shown in table.getvalue() and "t=0/0/0" in table.getvalue()  # the base baseline
    header = render_csv(summary).splitlines()[0]
    assert "p:t" in header.split(",") and not any(c.startswith("w:") for c in header.split(","))
    assert front_as_dict(summary, spec)["front"][0]["tuned"] == {"t": t}
    page = write_report(spec, view_of(study), tmp_path / "report").read_text()
    assert html.escape(shown) in page and not (tmp_path / "report" / "weights.png").exists()
    assert card_extra(spec, best, "knee", summary)["tuned values"] == {"t": t}
    assert best.recipe is not None
    card = model_card(pool, Recipe.from_dict(best.recipe), {}, None)
    assert "| checkpoint |\n|---|\n" in card and "- t: `per-tensor: " in card
