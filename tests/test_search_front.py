"""Pareto sets, hypervolume and knee against brute force; the front of a toy study."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from recycler.config import load_study_spec
from recycler.evaluate.evaluator import EvalResult
from recycler.evaluate.tasks import SuiteRequest
from recycler.merge.recipe import Recipe
from recycler.search import front as pareto
from recycler.search.analysis import analyse
from recycler.search.fidelity import RungPlan
from recycler.search.prepare import Prepared, study_fingerprint
from recycler.search.run import SearchDriver
from recycler.search.space import SearchSpace
from recycler.search.stored import TrialKey, mark_baselines_enqueued, queued_attrs, view_of
from recycler.search.study import open_study, resolve_objectives


def brute_force_front(values: np.ndarray, maximize: list[bool]) -> set[int]:
    """Row i is on the front iff no row j is >= in all objectives and > in one (in the better
    direction)."""
    signs = np.array([1.0 if m else -1.0 for m in maximize])
    v = values * signs
    out = set()
    for i in range(len(v)):
        if not any(np.all(v[j] >= v[i]) and np.any(v[j] > v[i]) for j in range(len(v)) if j != i):
            out.add(i)
    return out


def grid_volume(points: np.ndarray, ref: np.ndarray, maximize: list[bool]) -> float:
    """Exact dominated volume of integer points by counting unit cells (small ranges only)."""
    signs = np.array([-1.0 if m else 1.0 for m in maximize])
    p, r = points * signs, ref * signs  # minimisation
    lows = p.min(axis=0).astype(int)
    count = 0
    for cell in itertools.product(*[range(int(lo), int(hi)) for lo, hi in zip(lows, r)]):
        c = np.array(cell, dtype=float)  # the cell [c, c+1)
        if np.any(np.all(p <= c, axis=1)):
            count += 1
    return float(count)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("seed", range(6))
def test_pareto_mask_matches_brute_force(m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, size=(40, m)).astype(float)  # coarse: many ties and duplicates
    maximize = [bool(rng.integers(0, 2)) for _ in range(m)]
    mask = pareto.pareto_mask(values, maximize)
    assert set(np.flatnonzero(mask).tolist()) == brute_force_front(values, maximize)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_matches_cell_counting(m: int, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    points = rng.integers(0, 7, size=(12, m)).astype(float)
    maximize = [bool(rng.integers(0, 2)) for _ in range(m)]
    ref = pareto.nadir(points, maximize)
    # Push the reference one unit beyond the worst so every point has volume.
    ref = ref + np.array([-1.0 if up else 1.0 for up in maximize])
    assert pareto.hypervolume(points, ref, maximize) == pytest.approx(
        grid_volume(points, ref, maximize)
    )


def test_hypervolume_known_values_and_edge_cases() -> None:
    assert pareto.hypervolume([[1.0, 1.0]], [0.0, 0.0], [True, True]) == pytest.approx(1.0)
    # Two overlapping rectangles: 2*1 + 1*2 - 1*1 = 3.
    assert pareto.hypervolume([[2.0, 1.0], [1.0, 2.0]], [0.0, 0.0], [True, True]) == pytest.approx(
        3.0
    )
    # A point no better than the reference in one objective adds nothing.
    assert pareto.hypervolume([[2.0, 0.0]], [0.0, 0.0], [True, True]) == 0.0
    assert pareto.hypervolume(np.zeros((0, 2)), [0.0, 0.0], [True, True]) == 0.0
    # Mixed directions: maximise x, minimise y, reference (0, 10): point (3, 4) → 3 * 6.
    assert pareto.hypervolume([[3.0, 4.0]], [0.0, 10.0], [True, False]) == pytest.approx(18.0)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_hypervolume_contributions_are_what_each_row_alone_adds(m: int) -> None:
    rng = np.random.default_rng(m)
    points = rng.integers(0, 5, size=(15, m)).astype(float)  # coarse: duplicates, dominated rows
    maximize = [bool(rng.integers(0, 2)) for _ in range(m)]
    ref = pareto.nadir(points, maximize) + np.array([-1.0 if up else 1.0 for up in maximize])
    whole = pareto.hypervolume(points, ref, maximize)
    got = pareto.hypervolume_contributions(points, ref, maximize)
    for i in range(len(points)):
        without = pareto.hypervolume(np.delete(points, i, axis=0), ref, maximize)
        assert got[i] == pytest.approx(whole - without, abs=1e-9)
    dominated = ~pareto.pareto_mask(points, maximize)
    assert dominated.any() and np.all(got[dominated] == 0.0)


def test_estimated_contributions_are_close_to_the_exact_ones() -> None:
    rng = np.random.default_rng(4)
    points = rng.random((20, 4))
    maximize = [True, False, True, False]
    ref = pareto.nadir(points, maximize) + np.array([-0.1, 0.1, -0.1, 0.1])
    exact = pareto.hypervolume_contributions(points, ref, maximize)
    estimated = pareto.estimated_contributions(points, ref, maximize, seed=0)
    assert np.abs(estimated - exact).max() < 0.03 * exact.max()
    assert list(np.argsort(-exact)[:3]) == list(np.argsort(-estimated)[:3])
    dominated = ~pareto.pareto_mask(points, maximize)
    assert np.all(estimated[dominated] == 0.0)
    again = pareto.estimated_contributions(points, ref, maximize, seed=0)
    assert np.array_equal(estimated, again)  # seeded


def test_hypervolume_history_never_decreases() -> None:
    rng = np.random.default_rng(7)
    values = rng.random((30, 3))
    hist = pareto.hypervolume_history(values, [True, False, True])
    assert len(hist) == 30 and all(b >= a - 1e-12 for a, b in itertools.pairwise(hist))


def test_knee_is_the_bend_of_a_front() -> None:
    front = [[1.0, 0.0], [0.9, 0.8], [0.5, 0.9], [0.0, 1.0]]
    assert pareto.knee_index(front, [True, True]) == 1
    # Minimising both: the same shape mirrored.
    assert pareto.knee_index([[-a, -b] for a, b in front], [False, False]) == 1
    # An objective constant over the front does not matter.
    assert pareto.knee_index([[1.0, 5.0], [2.0, 5.0]], [True, True]) == 1


def test_dominated_rows_and_dominates() -> None:
    front = [[0.9, 0.2], [0.5, 0.5]]
    others = [[0.8, 0.1], [0.4, 0.4], [0.5, 0.5], [1.0, 0.0]]
    assert pareto.dominated_rows(front, others, [True, True]) == [[0], [1]]
    assert pareto.dominates([1, 1], [1, 0], [True, True])
    assert not pareto.dominates([1, 1], [1, 1], [True, True])
    assert pareto.dominates([0, 1], [1, 1], [False, True])


# ---- a toy two-objective study through the real driver, Optuna and SQLite -----------------


def weights_of(recipe: Recipe) -> list[float]:
    """A toy trial's weights: one number per model (the typed recipe the evaluator gets)."""
    weights = [m.weight for m in recipe.models]
    assert all(isinstance(w, int | float) for w in weights), weights
    return [float(w) for w in weights]  # type: ignore[arg-type]


class ToyEvaluator:
    """A toy problem scored from the recipe's weights; two in flight, answered out of order."""

    capacity = 2

    def __init__(self) -> None:
        self.pending: list[tuple[int, Recipe, str]] = []
        self.calls = 0

    def submit(self, ticket: int, recipe: Recipe, split: str, docs: object = None) -> None:
        self.pending.append((ticket, recipe, split))

    def wait(self) -> list[tuple[int, EvalResult]]:
        ticket, recipe, split = self.pending.pop()  # the newest first: out of order
        self.calls += 1
        w = weights_of(recipe)
        gain = 1.0 if split == "dev" else 0.9
        quality = gain * (w[0] + 0.6 * w[1] ** 0.5)  # maximised
        cost = (w[2] - 0.2) ** 2 + 0.5 * w[1]  # minimised
        return [
            (
                ticket,
                EvalResult(
                    ok=True,
                    metrics={"toy_q": {"acc,none": quality}, "toy_c": {"loss": cost}},
                    merge_seconds=0.01,
                    eval_seconds=0.02,
                ),
            )
        ]

    def close(self) -> None:
        pass


# The toy tasks are scored whole, one "document" each (no lm-eval behind them).
TOY_RUNGS = RungPlan.build({"toy_q": [0], "toy_c": [0]}, None, 0)
TOY_SUITE = SuiteRequest(names=("toy_q", "toy_c"))


def toy_study(
    tmp_path: Path, sampler: str = "tpe", n: int = 3, objective: str | None = None
) -> Prepared:
    search: dict[str, object] = {"sampler": sampler, "seed": 1, "baselines": ["uniform", "singles"]}
    if objective is not None:
        search["objective"] = objective
    data = {
        "name": "toy",
        "storage": "sqlite:///toy.db",
        "pool": {"checkpoints": [f"c{i}" for i in range(n)]},
        "search": search,
        "eval": {"tasks_dir": "."},
        "objectives": [
            {"name": "quality", "task": "toy_q", "metric": "acc", "direction": "maximize"},
            {"name": "cost", "task": "toy_c", "metric": "loss", "direction": "minimize"},
        ],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    spec = load_study_spec(tmp_path / "study.yaml")
    space = SearchSpace(
        spec, [f"c{i}" for i in range(n)], [f"/pool/c{i}" for i in range(n)], None, ["w.weight"]
    )
    objectives = resolve_objectives(spec, lambda t, m: None)
    handle = open_study(spec, study_fingerprint(spec, space, TOY_RUNGS), objectives)
    for label, w in [
        ("uniform", [1 / n] * n),
        *((f"single:c{i}", [float(i == j) for j in range(n)]) for i in range(n)),
    ]:
        params = space.encode(w)
        assert params is not None
        handle.study.enqueue_trial(params, user_attrs={TrialKey.BASELINE: label})
    mark_baselines_enqueued(handle.study)  # as `prepare` does: a second opener waits for it
    return Prepared(spec, None, space, objectives, handle, [], TOY_RUNGS, TOY_SUITE)


def test_toy_study_front_matches_brute_force_and_optuna(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_study(tmp_path)
    evaluator = ToyEvaluator()
    with SearchDriver(prepared, lambda: evaluator, capacity=evaluator.capacity) as driver:
        driver.run(24)
        driver.rescore_front()
    study = optuna.load_study(study_name="toy", storage=prepared.spec.storage_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 24 and all(t.state.name == "COMPLETE" for t in trials)
    # Baselines first, in order, with exactly their weights.
    assert [t.user_attrs.get(TrialKey.BASELINE) for t in trials[:4]] == [
        "uniform",
        "single:c0",
        "single:c1",
        "single:c2",
    ]
    assert trials[2].user_attrs[TrialKey.WEIGHTS] == {"c0": 0.0, "c1": 1.0, "c2": 0.0}
    for t in trials:  # simplex weights
        assert sum(t.user_attrs[TrialKey.WEIGHTS].values()) == pytest.approx(1.0, abs=1e-5)
        assert min(t.user_attrs[TrialKey.WEIGHTS].values()) >= 0
    view = view_of(study)
    summary = analyse(view, "dev")
    values = np.array([r.vector_dev for r in view.complete])
    numbers = [r.number for r in view.complete]
    brute = {numbers[i] for i in brute_force_front(values, [True, False])}
    assert {m.record.number for m in summary.members} == brute
    assert {t.number for t in study.best_trials} == brute  # Optuna agrees
    assert summary.knee in brute
    assert summary.hypervolume == pytest.approx(
        pareto.hypervolume(values, pareto.nadir(values, [True, False]), [True, False])
    )
    # The Pareto set and the baselines were re-scored on test (0.9 × quality), stored on the study.
    test = analyse(view_of(study), "test")
    wanted = {m.record.number: m for m in [*test.members, *test.baselines]}
    scored = [m for m in wanted.values() if m.values is not None]
    assert len(scored) == len(wanted)
    for m in scored:
        assert m.values[0] == pytest.approx(0.9 * m.record.vector_dev[0])  # type: ignore[index]
    # A repeated proposal costs nothing: the evaluator saw fewer calls than trials + test scores.
    assert evaluator.calls <= 24 + len(scored)


def test_resumed_study_continues_to_the_total(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_study(tmp_path, sampler="random")
    with SearchDriver(prepared, ToyEvaluator, capacity=2) as driver:
        driver.run(6)
    first = [t.params for t in prepared.handle.study.get_trials()]
    # A second process: open the same study again and ask for 10 in total.
    spec = prepared.spec
    handle = open_study(
        spec, study_fingerprint(spec, prepared.space, TOY_RUNGS), prepared.objectives
    )
    again = Prepared(
        spec, None, prepared.space, prepared.objectives, handle, [], TOY_RUNGS, TOY_SUITE
    )
    with SearchDriver(again, ToyEvaluator, capacity=2) as driver:
        driver.run(10)
    trials = handle.study.get_trials()
    assert len(trials) == 10 and [t.params for t in trials[:6]] == first
    # The reseeded sampler does not replay the first run's proposals.
    assert all(t.params not in first for t in trials[6:])


@pytest.mark.parametrize(("sampler", "objective"), [("cmaes", None), ("tpe", "macro_average")])
def test_scalarised_study_optimises_the_macro_average_and_keeps_every_objective(
    tmp_path: Path, sampler: str, objective: str | None
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_study(tmp_path, sampler=sampler, objective=objective)
    with SearchDriver(prepared, ToyEvaluator, capacity=1) as driver:
        driver.run(10)
    study = prepared.handle.study
    assert study.metric_names == ["macro"] and len(study.directions) == 1
    for t in study.get_trials():
        q, c = (
            t.user_attrs[TrialKey.OBJECTIVES]["quality"],
            t.user_attrs[TrialKey.OBJECTIVES]["cost"],
        )
        assert t.values == [pytest.approx((q - c) / 2)]  # cost is minimised: it enters negated
    summary = analyse(view_of(study), "dev")
    values = np.array([r.vector_dev for r in view_of(study).complete])
    assert {m.record.number for m in summary.members} == {
        r.number
        for i, r in enumerate(view_of(study).complete)
        if i in brute_force_front(values, [True, False])
    }


def test_a_trial_killed_while_its_parameters_were_stored_is_rerun_whole(tmp_path: Path) -> None:
    """Optuna stores suggested parameters one call at a time: a kill in between leaves some."""
    import socket

    from recycler.search.study import enqueue, fail_stale_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_study(tmp_path)  # enqueues uniform + 3 singles
    study = prepared.handle.study
    names = prepared.space.param_names()
    intended = {name: float(i == 1) for i, name in enumerate(names)}
    enqueue(study, intended, queued_attrs(intended, baseline="single:c1"))
    for _ in range(4):  # the toy's own baselines, told at once
        t = study.ask()
        for name in names:
            t.suggest_float(name, 0.0, 1.0)
        study.tell(t, [0.5, 0.5])
    killed = study.ask()
    killed.suggest_float(names[0], 0.0, 1.0)  # the process died after storing one parameter
    killed.set_user_attr(
        TrialKey.OWNER, f"{socket.gethostname()}:999999999:1.00"
    )  # a pid that cannot exist
    assert fail_stale_trials(prepared.handle) == [killed.number]
    [rerun] = [
        t for t in study.get_trials() if t.user_attrs.get(TrialKey.RERUN_OF) == killed.number
    ]
    assert rerun.state.name == "WAITING" and rerun.user_attrs[TrialKey.BASELINE] == "single:c1"
    assert (
        rerun.user_attrs[TrialKey.ENQUEUED_PARAMS] == intended
    )  # every parameter, not the one stored
    again = study.ask()
    assert again.number == rerun.number
    assert {name: again.suggest_float(name, 0.0, 1.0) for name in names} == intended
