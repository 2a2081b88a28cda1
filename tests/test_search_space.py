"""Search space ⇄ recipes, samplers, the result cache and the greedy soup's replay."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from tiny_pool import make_pool

from recycler.config import StudySpec, load_study_spec
from recycler.errors import RecyclerError
from recycler.merge.engine import merge_state_dict
from recycler.merge.recipe import Recipe
from recycler.pool import Pool
from recycler.samplers import SAMPLERS, effective_seed, make_sampler
from recycler.search.baselines import greedy_state, members_weights
from recycler.search.cache import ResultCache, recipe_key
from recycler.search.space import SearchSpace
from recycler.search.stored import Objective, TrialRecord

LLAMA_NAMES = [
    "model.embed_tokens.weight",
    *(
        f"model.layers.{i}.{part}"
        for i in range(12)
        for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")
    ),
    "model.norm.weight",
    "lm_head.weight",
]


def spec_of(tmp_path: Path, **search: Any) -> StudySpec:
    merge = search.pop("merge", {})
    data = {
        "name": "s",
        "pool": {"base": "base", "checkpoints": ["c/*"]},
        "merge": merge,
        "search": search,
        "eval": {"tasks_dir": "."},
        "objectives": [{"name": "a", "task": "t", "metric": "acc"}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    return load_study_spec(tmp_path / "study.yaml")


def space_of(
    tmp_path: Path, n: int = 3, names: list[str] | None = None, **search: Any
) -> SearchSpace:
    ckpts = [f"k{i}" for i in range(n)]
    return SearchSpace(
        spec_of(tmp_path, **search),
        ckpts,
        [f"/p/{c}" for c in ckpts],
        "/p/base",
        names or LLAMA_NAMES,
    )


def suggest_all(space: SearchSpace, seed: int) -> Any:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    return space.suggest(trial), trial.params


@pytest.mark.parametrize("seed", range(5))
def test_simplex_weights_are_a_distribution_and_decode_from_params(
    tmp_path: Path, seed: int
) -> None:
    space = space_of(tmp_path, n=4)
    proposal, params = suggest_all(space, seed)
    w = proposal.weights["all"]
    assert len(w) == 4 and all(x >= 0 for x in w) and sum(w) == pytest.approx(1.0)
    xs = [-math.log(params[f"w:k{i}"]) for i in range(4)]
    assert w == pytest.approx([x / sum(xs) for x in xs])


def test_encode_round_trips_baselines_exactly(tmp_path: Path) -> None:
    space = space_of(tmp_path, n=3)
    for w in ([1 / 3] * 3, [0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]):
        params = space.encode(w)
        assert params is not None and all(0.0 <= v <= 1.0 for v in params.values())
        assert space.decode(params).weights["all"] == pytest.approx(w, abs=1e-12)
    assert space.encode([-0.1, 0.6, 0.5]) is None
    assert space.encode([0.0, 0.0, 0.0]) is None


def test_zero_coordinates_take_the_limit_and_all_ones_give_uniform(tmp_path: Path) -> None:
    space = space_of(tmp_path, n=3)
    # u → 0 sends x = -log u to infinity: the limit is that checkpoint alone, or an equal
    # soup of those at 0 (GP and CMA-ES do propose the boundary; it must not fail the trial).
    assert space.decode({"w:k0": 0.0, "w:k1": 0.5, "w:k2": 0.9}).weights["all"] == [1.0, 0.0, 0.0]
    assert space.decode({"w:k0": 0.0, "w:k1": 0.5, "w:k2": 0.0}).weights["all"] == [0.5, 0.0, 0.5]
    near = space.decode({"w:k0": 1e-300, "w:k1": 0.5, "w:k2": 0.9}).weights["all"]
    assert near[0] > 0.99 and sum(near) == pytest.approx(1.0)
    assert space.decode({"w:k0": 1.0, "w:k1": 1.0, "w:k2": 1.0}).weights["all"] == [1 / 3] * 3


def test_box_weights_and_tuned_parameters(tmp_path: Path) -> None:
    space = space_of(
        tmp_path,
        n=2,
        weights="box",
        bounds=[-0.5, 1.5],
        merge={"method": "ties"},
        tune=["density", {"lambda": [0.5, 2.0]}],
    )
    assert space.param_names() == ["w:k0", "w:k1", "p:density", "p:lambda"]
    proposal, params = suggest_all(space, 0)
    assert all(-0.5 <= x <= 1.5 for x in proposal.weights["all"])
    assert proposal.weights["all"] == [params["w:k0"], params["w:k1"]]
    recipe = space.recipe_dict(proposal)
    assert recipe["parameters"] == {"density": params["p:density"], "lambda": params["p:lambda"]}
    Recipe.from_dict(recipe)  # the engine accepts it
    # Baselines take mergekit's defaults for tuned parameters when inside the range.
    enc = space.encode([1.0, 0.0])
    assert enc is not None and enc["p:density"] == 1.0 and enc["p:lambda"] == 1.0
    assert space.encode([2.0, 0.0]) is None  # outside the bounds


def test_layer_groups_become_filters_that_select_each_layer(tmp_path: Path) -> None:
    space = space_of(tmp_path, n=2, granularity="layers:5")
    assert [g.name for g in space.groups] == [
        "layers0-2",
        "layers3-5",
        "layers6-7",
        "layers8-9",
        "layers10-11",
        "other",
    ]
    proposal, _ = suggest_all(space, 3)
    recipe = Recipe.from_dict(space.recipe_dict(proposal))
    for name in LLAMA_NAMES:
        layer = int(name.split(".")[2]) if ".layers." in name else None
        group = (
            "other"
            if layer is None
            else next(g.name for g in space.groups if f"model.layers.{layer}." in g.filters)
        )
        # The engine resolves each tensor's weights to its own group's weights.
        assert recipe.weights_for(name, 12) == pytest.approx(proposal.weights[group])
    attrs = space.weights_by_checkpoint(proposal)
    assert set(attrs) == {"k0", "k1"} and set(attrs["k0"]) == {g.name for g in space.groups}


def test_blocks_groups(tmp_path: Path) -> None:
    space = space_of(tmp_path, n=2, granularity="blocks")
    proposal, _ = suggest_all(space, 4)
    recipe = Recipe.from_dict(space.recipe_dict(proposal))
    assert recipe.weights_for("model.layers.3.self_attn.q_proj.weight", 12) == pytest.approx(
        proposal.weights["attn"]
    )
    assert recipe.weights_for("model.layers.3.mlp.up_proj.weight", 12) == pytest.approx(
        proposal.weights["mlp"]
    )
    assert recipe.weights_for("model.layers.3.input_layernorm.weight", 12) == pytest.approx(
        proposal.weights["other"]
    )
    assert recipe.weights_for("lm_head.weight", 12) == pytest.approx(proposal.weights["other"])


def test_granularity_errors(tmp_path: Path) -> None:
    with pytest.raises(RecyclerError, match="layers:13: the pool has only 12 layers"):
        space_of(tmp_path, granularity="layers:13")
    with pytest.raises(RecyclerError, match="blocks needs attention and MLP tensors"):
        space_of(tmp_path, granularity="blocks", names=["a.weight", "b.weight"])


def test_grouped_recipe_merges_like_the_engine_on_a_real_pool(tmp_path: Path) -> None:
    paths = make_pool(tmp_path / "pool")
    pool = Pool.open([paths["c0"], paths["c2"]], paths["base"])
    (tmp_path / "s").mkdir()
    spec = spec_of(tmp_path / "s", granularity="layers:2")
    space = SearchSpace.from_pool(spec, pool)
    proposal, _ = suggest_all(space, 5)
    merged = merge_state_dict(pool, Recipe.from_dict(space.recipe_dict(proposal)))
    a, b = (c.read("model.layers.1.mlp.up_proj.weight").float() for c in pool.checkpoints)
    w = proposal.weights["layers1-1"]
    expected = (w[0] * a + w[1] * b) / sum(w)
    torch.testing.assert_close(
        merged["model.layers.1.mlp.up_proj.weight"].float(), expected, atol=1e-2, rtol=1e-2
    )


@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.multi_objective])
def test_samplers_with_the_same_seed_propose_the_same(tmp_path: Path, name: str) -> None:
    def proposals(seed: int) -> list[dict[str, float]]:
        study = optuna.create_study(
            directions=["maximize", "maximize"], sampler=make_sampler(name, seed, n_objectives=2)
        )
        out = []
        for _ in range(11):  # past the 10 random start-up trials of tpe and gp
            t = study.ask()
            x, y = t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)
            study.tell(t, [x * (1 - y), y - x * x])
            out.append(t.params)
        return out

    first = proposals(7)
    assert proposals(7) == first
    assert proposals(8) != first


def test_cmaes_is_single_objective_and_seeded() -> None:
    with pytest.raises(RecyclerError, match="one value"):
        make_sampler("cmaes", 0, n_objectives=2)
    assert isinstance(make_sampler("cmaes", 0, n_objectives=1), optuna.samplers.CmaEsSampler)
    assert effective_seed(3, 0) == 3 and effective_seed(3, 5) != effective_seed(3, 6)


def test_cache_keys_round_weights_and_separate_splits() -> None:
    r1 = {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 0.333333333}}],
    }
    r2 = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.33333}}]}
    r3 = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.3334}}]}
    assert recipe_key(r1) == recipe_key(r2) != recipe_key(r3)
    assert recipe_key({"w": -0.0}) == recipe_key({"w": 0.0})
    cache = ResultCache()
    from recycler.search.cache import CachedResult

    cache.put(r1, "dev", CachedResult(4, {"t": {"acc": 0.5}}))
    cache.put(r2, "dev", CachedResult(9, {"t": {"acc": 0.1}}))  # the first stays
    hit = cache.get(r2, "dev")
    assert hit is not None and hit.trial_number == 4 and cache.get(r1, "test") is None


def record(
    number: int,
    state: str,
    baseline: str | None,
    score: float | None = None,
    members: list[str] | None = None,
    reason: str | None = None,
) -> TrialRecord:
    objectives = {"a": score, "b": score} if score is not None else {}
    r = TrialRecord(
        number, state, objectives, {}, {}, {}, baseline, None, None, reason, user_members=members
    )
    r.vector_dev = [score, score] if score is not None else None
    return r


def test_greedy_soup_replays_from_stored_trials() -> None:
    objs = [Objective("a", "t", "acc", True), Objective("b", "u", "acc", True)]
    names = ["x", "y", "z"]
    singles = [
        record(0, "COMPLETE", "single:x", 0.5),
        record(1, "COMPLETE", "single:y", 0.7),
        record(2, "RUNNING", "single:z"),
    ]
    assert greedy_state(singles, names, objs).blocked
    # Every single failed: the soup waits for their re-runs instead of settling on none.
    failed = [
        record(n, "FAIL", f"single:{x}", None, None, "AssertionError")
        for n, x in [(0, "x"), (1, "y"), (2, "z")]
    ]
    assert greedy_state(failed, names, objs).blocked
    singles[2] = record(2, "COMPLETE", "single:z", 0.6)
    # Best single first (y), then z: the next soup to score is {y, z}.
    state = greedy_state(singles, names, objs)
    assert state.next_members == ["y", "z"] and not state.done
    steps = [
        *singles,
        record(3, "COMPLETE", "greedy", 0.65, ["y", "z"]),
    ]  # dropped: worse than y alone
    state = greedy_state(steps, names, objs)
    assert state.next_members == ["x", "y"]
    # A step killed mid-run is re-run; the stale failure does not count.
    steps += [
        record(4, "FAIL", "greedy", None, ["x", "y"], "stale: process gone"),
        record(5, "COMPLETE", "greedy", 0.71, ["x", "y"]),
    ]
    state = greedy_state(steps, names, objs)
    assert state.done and state.soup_trial == 5
    assert members_weights(names, ["x", "y"]) == [0.5, 0.5, 0.0]


def test_nsga2_evolves_within_a_small_budget() -> None:
    from recycler.samplers import nsga2_population

    sampler = make_sampler("nsga2", 0, n_objectives=2, n_trials=50)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler)
    # Five generations of 10 in 50 trials; never below 8 nor above Optuna's default of 50.
    assert (nsga2_population(50), nsga2_population(10), nsga2_population(1000)) == (10, 8, 50)


@pytest.mark.parametrize(
    ("method", "n", "tune", "random"),
    [
        ("slerp", 1, ["t"], False),
        ("della", 2, ["epsilon", "density"], True),
        ("sce", 2, ["select_topk"], False),
        ("karcher", 2, [], False),
    ],
)
def test_new_methods_tune_their_parameters_and_merge(
    tmp_path: Path, method: str, n: int, tune: list[str], random: bool
) -> None:
    """The method's own tune ranges (from its description) reach a recipe the engine merges."""
    paths = make_pool(tmp_path / "pool")
    pool = Pool.open([paths["c0"], paths["c2"]][:n], paths["base"])
    (tmp_path / "s").mkdir()
    spec = spec_of(tmp_path / "s", merge={"method": method}, tune=tune)
    assert [t.name for t in spec.search.tune] == tune
    space = SearchSpace.from_pool(spec, pool)
    proposal, _ = suggest_all(space, 3)
    recipe = space.recipe_dict(proposal)
    assert recipe["parameters"] == proposal.tuned if tune else "parameters" not in recipe
    assert ("random_seed" in recipe) == random
    assert all(("parameters" in m) == (method in ("della", "karcher")) for m in recipe["models"])
    merged = merge_state_dict(pool, Recipe.from_dict(recipe))
    assert set(merged) == set(pool.tensor_names) and all(
        bool(torch.isfinite(t.float()).all()) for t in merged.values()
    )
