"""Multi-fidelity trials: ASHA's promotions, the rungs' documents, per-document scores that
combine into a full run's, the driver's decisions, cost, and bad `search.fidelity` keys.

The driver tests score toy documents (a value per document computed from the recipe's
weights) through the micro pool's real lm-eval tasks, so each decision can be replayed
by hand; the end-to-end test (a killed and resumed search) runs real lm-eval on a real
local Ray.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from test_search_front import weights_of

from recycler.cli import main
from recycler.commands.search import run_search
from recycler.config import load_study_spec
from recycler.errors import RecyclerError
from recycler.evaluate import doc_scores
from recycler.evaluate.docsplit import part_ids, rung_ids
from recycler.evaluate.evaluator import EvalResult
from recycler.evaluate.model import ResidentModel
from recycler.evaluate.results import DocScores
from recycler.evaluate.runner import evaluate_tasks, score_documents
from recycler.evaluate.tasks import folder_request, load_suite, suite_request
from recycler.merge.recipe import Recipe
from recycler.search.budget import Budget, cost_of
from recycler.search.fidelity import RungPlan, promotes, promotion_order
from recycler.search.prepare import Prepared, study_fingerprint
from recycler.search.run import FREE_TRIALS_LIMIT, SearchDriver
from recycler.search.space import SearchSpace
from recycler.search.stored import (
    TrialKey,
    mark_baselines_enqueued,
    queued_attrs,
    view_of,
    write_dev_docs,
)
from recycler.search.study import enqueue, open_study, resolve_objectives
from recycler.zoo.checkpoints import read_full
from recycler.zoo.skills import SKILLS
from recycler.zoo.tasks import GROUP, task_name

TASKS = [task_name(s) for s in SKILLS]


# ---- ASHA's rule, by hand -------------------------------------------------------------


def test_promotion_order_is_fronts_then_hypervolume_contribution() -> None:
    # Two maximised objectives, both ranging over [0, 1]: the reference point is
    # (-0.1, -0.1). Front 1: 0, 1, 2, 4 (3 is dominated by 2, 5 by everyone). What each
    # alone dominates: 2: (0.2, 0.5] × (0, 0.5] = 0.15; 4: (0, 0.2] × (0.5, 0.9] = 0.08;
    # 0: (0.5, 1] × (-0.1, 0] = 0.05; 1: (-0.1, 0] × (0.9, 1] = 0.01. Front 2: 3; front 3: 5.
    values = {
        0: [1.0, 0.0],
        1: [0.0, 1.0],
        2: [0.5, 0.5],
        3: [0.4, 0.4],
        4: [0.2, 0.9],
        5: [0.1, 0.1],
    }
    assert promotion_order(values, [True, True]) == [2, 4, 0, 1, 3, 5]
    # Six finished the rung, eta 3: the best two go on (crowding distance, then the trial
    # number, kept the two ends, 0 and 1).
    assert [n for n in values if promotes(n, values, [True, True], 3)] == [2, 4]
    # Eta 2: three go on. A minimised objective reverses its order.
    assert [n for n in values if promotes(n, values, [True, True], 2)] == [0, 2, 4]
    flipped = {n: [v[0], -v[1]] for n, v in values.items()}
    assert promotion_order(flipped, [True, False]) == [2, 4, 0, 1, 3, 5]


def test_a_new_all_rounder_beats_old_specialists() -> None:
    """The micro pool's case: the baselines are specialists, each the best in one skill
    and the worst in the others. Crowding distance is infinite for all of them, so the
    trial number decided and a later all-rounder was pruned; it alone dominates the most."""
    values = {0: [1.0, 0.0, 0.0], 1: [0.0, 1.0, 0.0], 2: [0.0, 0.0, 1.0], 3: [0.6, 0.6, 0.6]}
    assert promotion_order(values, [True] * 3)[0] == 3
    assert promotes(3, values, [True] * 3, 2)  # the best two of four: it is one
    assert promotes(3, values, [True] * 3, 3)  # the best one of four
    # Ten objectives: the contributions are estimated (exact ones would take minutes).
    many = {n: [float(n == j) for j in range(10)] for n in range(10)} | {10: [0.6] * 10}
    assert promotion_order(many, [True] * 10)[0] == 10


def test_ties_are_not_decided_by_age() -> None:
    """Trials of equal values are ordered by a seeded draw: the same every time for one
    seed, and any of them may come first (by trial number, the oldest always did)."""
    equal = {n: [0.5, 0.5] for n in range(4)}
    assert promotion_order(equal, [True, True], seed=3) == promotion_order(
        equal, [True, True], seed=3
    )
    firsts = {promotion_order(equal, [True, True], seed=s)[0] for s in range(30)}
    assert firsts == {0, 1, 2, 3}
    # Equal values share their point's contribution: a copy of the best trial is not
    # ranked below the rest of the front (each copy alone adds nothing).
    values = {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [0.5, 0.5], 3: [0.5, 0.5]}
    assert set(promotion_order(values, [True, True])[:2]) == {2, 3}


def test_fewer_than_eta_trials_promote_the_best_so_far() -> None:
    assert promotes(7, {7: [0.1]}, [True], 3)  # the first trial of a rung goes on
    assert not promotes(8, {7: [0.5], 8: [0.4]}, [True], 3)
    assert promotes(8, {7: [0.5], 8: [0.6]}, [True], 3)
    # Three trials, eta 3: one goes on; four, eta 2: two.
    assert not promotes(2, {1: [0.9], 2: [0.8], 3: [0.1]}, [True], 3)
    assert promotes(2, {1: [0.9], 2: [0.8], 3: [0.1], 4: [0.0]}, [True], 2)


# ---- the rungs' documents -------------------------------------------------------------


def test_rungs_are_nested_seeded_and_disjoint_from_test() -> None:
    dev = part_ids(300, 0.5, 7, "dev")
    test = part_ids(300, 0.5, 7, "test")
    rungs = rung_ids(dev, [0.11, 0.33, 1.0], 7)
    assert [len(r) for r in rungs] == [round(150 * f) for f in (0.11, 0.33, 1.0)]
    assert set(rungs[0]) < set(rungs[1]) < set(rungs[2]) == set(dev)
    assert not set(rungs[2]) & set(test)
    assert rungs == rung_ids(list(reversed(dev)), [0.11, 0.33, 1.0], 7)  # order-free
    assert rungs[0] != rung_ids(dev, [0.11, 0.33, 1.0], 8)[0]  # seeded
    assert rungs[0] != sorted(dev)[: len(rungs[0])]  # a random subset, not the first ones


def test_plan_of_the_micro_pool(micro_zoo: Path) -> None:
    suite = load_suite(folder_request(micro_zoo / "tasks", TASKS))
    dev = suite.doc_ids("dev")
    plan = RungPlan.build(dev, _fidelity([0.25, 0.5, 1.0]), 0)
    assert plan.multi and plan.full_docs == sum(len(ids) for ids in dev.values())
    assert [plan.n_docs(k) for k in range(3)] == [len(TASKS) * n for n in (10, 20, 40)]
    for task in TASKS:
        assert set(plan.docs[0][task]) < set(plan.docs[1][task]) < set(plan.docs[2][task])
    assert plan.missing({}, 0) == plan.docs[0]
    assert not RungPlan.build(dev, None, 0).multi


def _fidelity(rungs: list[float], eta: float = 3) -> Any:
    from recycler.search_spec import FidelitySpec

    return FidelitySpec(rungs=rungs, eta=eta)


# ---- per-document scores combine into a full run's -------------------------------------


def test_rung_by_rung_scores_equal_a_full_run(micro_zoo: Path) -> None:
    """A promoted trial scores each rung's new documents only; combined per task (and for
    the group, as lm-eval aggregates it) they equal one run over every dev document."""
    request = folder_request(micro_zoo / "tasks", [GROUP])
    suite = load_suite(request)
    rm = ResidentModel(micro_zoo / "base", dtype=torch.float32)
    rm.load_tensors(read_full(sorted((micro_zoo / "checkpoints").iterdir())[1]))
    plan = RungPlan.build(suite.doc_ids("dev"), _fidelity([0.11, 0.33, 1.0]), 3)
    scores: DocScores = {}
    for rung in range(3):
        new = plan.missing(scores, rung)
        part = score_documents(rm, request, "dev", new)
        assert doc_scores.n_docs(part) == plan.n_docs(rung) - (plan.n_docs(rung - 1) if rung else 0)
        scores = doc_scores.merged(scores, part)
    full = evaluate_tasks(rm, request, "dev")
    combined = doc_scores.aggregate(suite, scores)
    assert combined == full  # the same floats, the group's unweighted mean included
    assert GROUP in combined and set(TASKS) <= set(combined)
    # A rung's scores are those of a run on that rung's documents alone.
    first = doc_scores.restricted(scores, plan.docs[0])
    assert first is not None
    alone = doc_scores.aggregate(suite, score_documents(rm, request, "dev", plan.docs[0]))
    assert doc_scores.aggregate(suite, first) == alone
    with pytest.raises(ValueError, match="scored twice"):
        doc_scores.merged(scores, first)


# ---- the driver's decisions, replayed by hand ------------------------------------------


def toy_value(weights: list[float], task_index: int, doc: int) -> float:
    """A toy document score: the task's checkpoint weight, made noisy per document."""
    w = weights[task_index % len(weights)]
    return w * (1.0 + 0.5 * math.sin(3.1 * doc + task_index))


class ToyDocEvaluator:
    """Scores given documents with `toy_value`, one evaluation at a time, and logs each."""

    capacity = 1

    def __init__(self) -> None:
        self.pending: list[tuple[int, Recipe, str, Any]] = []
        self.log: list[tuple[list[float], dict[str, list[int]] | None]] = []

    def submit(self, ticket: int, recipe: Recipe, split: str, docs: Any = None) -> None:
        self.pending.append((ticket, recipe, split, docs))

    def wait(self) -> list[tuple[int, EvalResult]]:
        ticket, recipe, _split, docs = self.pending.pop()
        weights = weights_of(recipe)
        self.log.append((weights, None if docs is None else {t: list(i) for t, i in docs.items()}))
        if docs is None:  # the test split's re-scoring: plain metrics
            metrics = {
                t: {"acc": sum(toy_value(weights, k, d) for d in range(40)) / 40}
                for k, t in enumerate(TASKS)
            }
            return [(ticket, EvalResult(ok=True, metrics=metrics))]
        scores = {
            t: {
                "ids": sorted(docs[t]),
                "acc,none": [toy_value(weights, k, d) for d in sorted(docs[t])],
            }
            for k, t in enumerate(TASKS)
        }
        return [(ticket, EvalResult(ok=True, doc_scores=scores, eval_seconds=0.01))]

    def close(self) -> None:
        pass


def toy_prepared(
    tmp_path: Path, zoo: Path, search: dict[str, Any], n_checkpoints: int = 3
) -> Prepared:
    n = n_checkpoints
    data = {
        "name": "toy-mf",
        "storage": "sqlite:///toy.db",
        "pool": {"checkpoints": [f"c{i}" for i in range(n)]},
        "search": {"seed": 3, "objective": "macro_average", **search},
        "eval": {"tasks_dir": str(zoo / "tasks")},
        "objectives": [{"name": s, "task": task_name(s), "metric": "acc"} for s in SKILLS],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    spec = load_study_spec(tmp_path / "study.yaml")
    space = SearchSpace(
        spec, [f"c{i}" for i in range(n)], [f"/pool/c{i}" for i in range(n)], None, ["w.weight"]
    )
    request = suite_request(spec)
    rungs = RungPlan.build(
        load_suite(request).doc_ids("dev"), spec.search.fidelity, spec.eval.split_seed
    )
    objectives = resolve_objectives(spec, lambda t, m: True)
    handle = open_study(spec, study_fingerprint(spec, space, rungs), objectives)
    write_dev_docs(handle.study, rungs.full_docs)
    mark_baselines_enqueued(handle.study)  # as `prepare` does: a second opener waits for it
    return Prepared(spec, None, space, objectives, handle, [], rungs, request)


def test_driver_promotes_and_prunes_as_asha_by_hand(tmp_path: Path, micro_zoo: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_prepared(
        tmp_path, micro_zoo, {"fidelity": {"rungs": [0.25, 0.5, 1.0], "eta": 3}, "baselines": []}
    )
    plan, eta = prepared.rungs, 3
    evaluator = ToyDocEvaluator()
    told: list[Any] = []
    with SearchDriver(prepared, lambda: evaluator, capacity=1, on_trial=told.append) as driver:
        driver.run(14)

    def macro(weights: list[float], docs: dict[str, list[int]]) -> float:
        per_task = [
            sum(toy_value(weights, k, d) for d in docs[t]) / len(docs[t])
            for k, t in enumerate(TASKS)
        ]
        return sum(per_task) / len(per_task)

    # Replay: each logged evaluation scores one rung's new documents of one trial; a trial
    # finishing rung r goes on when its macro there is among the best max(1, n // eta).
    finished: dict[int, list[tuple[float, int]]] = {r: [] for r in range(3)}
    expected: list[tuple[tuple[float, ...], int]] = []  # (weights, rung) of each evaluation
    outcome: dict[tuple[float, ...], str] = {}
    queue: list[tuple[tuple[float, ...], int]] = []
    have: dict[tuple[float, ...], set[tuple[str, int]]] = {}
    for weights, docs in evaluator.log:
        assert docs is not None  # no baseline, no test split here
        key = tuple(weights)
        new = {(t, d) for t, ids in docs.items() for d in ids}
        assert not new & have.get(key, set()), "a document was scored twice"
        have[key] = have.get(key, set()) | new
        rung = next(
            r
            for r in range(3)
            if {(t, d) for t, ids in plan.docs[r].items() for d in ids} == have[key]
        )
        if queue:
            assert (key, rung) == queue.pop(0)  # a waiting promotion is served first
        else:
            assert rung == 0  # a new trial starts at the first rung
        expected.append((key, rung))
        value = macro(weights, plan.docs[rung])
        finished[rung].append((value, len(expected)))
        if rung == plan.last:
            outcome[key] = "COMPLETE"
            continue
        ranked = sorted(finished[rung], key=lambda p: -p[0])
        keep = max(1, len(ranked) // eta)
        if (value, len(expected)) in ranked[:keep]:
            queue.append((key, rung + 1))
        else:
            outcome[key] = f"PRUNED at {rung}"
    view = view_of(prepared.handle.study)
    for r in view.trials:
        assert r.recipe is not None
        key = tuple(m["parameters"]["weight"] for m in r.recipe["models"])
        got = r.state if r.state != "PRUNED" else f"PRUNED at {r.highest_rung}"
        assert got == outcome[key], (r.number, got, outcome[key])
        for rung, values in r.rungs.items():  # rung scores, as the user attributes say
            ids = plan.docs[rung]["zoo_inc"]
            want = sum(toy_value(list(key), 0, d) for d in ids) / len(ids)
            assert values["inc"] == pytest.approx(want)
    assert len(view.trials) == 14
    # A single-valued study also gets each rung's macro-average as an intermediate value
    # (what TPE ranks pruned trials by).
    for frozen in prepared.handle.study.get_trials():
        record = view.trials[frozen.number]
        assert record.highest_rung in frozen.intermediate_values
    assert any(r.state == "PRUNED" for r in view.trials)
    assert sum(r.state == "COMPLETE" for r in view.trials) >= 2
    # Pruned trials: told PRUNED, no objectives, absent from the front; cost counts their
    # documents only.
    pruned = [t for t in told if t.pruned_at_fraction is not None]
    assert {t.number for t in pruned} == {r.number for r in view.pruned}
    assert all(not r.objectives for r in view.pruned)
    spent = sum(sum(len(ids) for ids in docs.values()) for _, docs in evaluator.log if docs)
    assert cost_of(view)[0] == pytest.approx(spent / plan.full_docs)
    assert cost_of(view)[0] < 14  # cheaper than 14 full trials


def test_baselines_go_through_every_rung_and_rank_the_others(
    tmp_path: Path, micro_zoo: Path
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_prepared(
        tmp_path, micro_zoo, {"fidelity": {"rungs": [0.25, 1.0], "eta": 2}, "baselines": []}
    )
    space = prepared.space
    # The worst possible baseline: all weight on checkpoint 2 scores 0 on tasks 0, 1, 3, 4.
    params = space.encode([0.0, 0.0, 1.0])
    assert params is not None
    enqueue(prepared.handle.study, params, queued_attrs(params, baseline="single:c2"))
    evaluator = ToyDocEvaluator()
    with SearchDriver(prepared, lambda: evaluator, capacity=1) as driver:
        driver.run(3)
    plan = prepared.rungs
    # Scored rung by rung like any trial, but never pruned: it is scored at full fidelity.
    assert [docs for _, docs in evaluator.log[:2]] == [
        plan.docs[0],
        plan.missing({t: {"ids": ids} for t, ids in plan.docs[0].items()}, 1),
    ]
    view = view_of(prepared.handle.study)
    baseline = view.trials[0]
    assert baseline.baseline == "single:c2" and baseline.state == "COMPLETE"
    assert sorted(baseline.rungs) == [0, 1]
    # Its first-rung scores count among those the next trials are ranked against: with it,
    # two trials have finished rung 0 when trial 1 does, and eta 2 keeps the best one.
    assert promotes(1, {0: [0.1], 1: [0.2]}, [True], 2)
    second = view.trials[1]
    assert second.state == "COMPLETE"  # it beat the poor baseline on rung 0


def test_an_evaluation_of_other_documents_fails_the_trial(tmp_path: Path, micro_zoo: Path) -> None:
    class Shifted(ToyDocEvaluator):
        def submit(self, ticket: int, recipe: Recipe, split: str, docs: Any = None) -> None:
            shifted = {t: [i + 1 for i in ids] for t, ids in docs.items()} if docs else docs
            super().submit(ticket, recipe, split, shifted)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_prepared(
        tmp_path, micro_zoo, {"fidelity": {"rungs": [0.25, 1.0], "eta": 2}, "baselines": []}
    )
    # Failed trials count for nothing; the first three failing alike stop the search.
    with (
        SearchDriver(prepared, Shifted, capacity=1) as driver,
        pytest.raises(RecyclerError, match="first 3 trials all failed the same way"),
    ):
        driver.run(2)
    trials = view_of(prepared.handle.study).trials
    assert [t.state for t in trials] == ["FAIL", "FAIL", "FAIL"]
    assert trials[0].fail_reason == (
        "the evaluation returned scores of other documents than it was given"
    )


def test_a_budget_of_trials_that_cost_nothing_stops(tmp_path: Path, micro_zoo: Path) -> None:
    """One checkpoint: every proposal is the same recipe, so after the first every trial
    is a cache hit and the budget in full-trial equivalents can never be spent."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_prepared(
        tmp_path,
        micro_zoo,
        {"fidelity": {"rungs": [0.25, 1.0], "eta": 2}, "baselines": []},
        n_checkpoints=1,
    )
    with SearchDriver(prepared, ToyDocEvaluator, capacity=1) as driver:
        driver.run(Budget(cost=5))
    assert driver.stop_reason is not None and "scored no document" in driver.stop_reason
    view = view_of(prepared.handle.study)
    assert cost_of(view)[0] == pytest.approx(1.0)
    assert sum(r.cache_hit is not None for r in view.trials) == FREE_TRIALS_LIMIT


def test_budget_in_full_trial_equivalents(tmp_path: Path, micro_zoo: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_prepared(
        tmp_path, micro_zoo, {"fidelity": {"rungs": [0.25, 1.0], "eta": 3}, "baselines": []}
    )
    evaluator = ToyDocEvaluator()
    with SearchDriver(prepared, lambda: evaluator, capacity=1) as driver:
        driver.run(Budget(cost=2.5))
    spent = cost_of(view_of(prepared.handle.study))[0]
    # It stops once 2.5 full trials are spent, overshooting by at most one evaluation.
    assert 2.5 <= spent <= 2.5 + 1.0
    n = len(evaluator.log)
    assert n > 3  # most trials stop at a quarter of the documents


def test_a_rung_too_small_to_rank_scores_ten_documents_of_each_task() -> None:
    """The README's rungs on the micro pool's 40 dev documents: 0.11 would score 4 (every
    search trial was pruned there); it scores 10, with a note, and stays nested."""
    dev = {"a": list(range(40))}
    plan = RungPlan.build(dev, _fidelity([0.11, 0.33, 1.0]), 0)
    assert [len(plan.docs[k]["a"]) for k in range(3)] == [10, 13, 40]
    assert set(plan.docs[0]["a"]) < set(plan.docs[1]["a"])
    assert plan.notes == (
        "search.fidelity.rungs: rung 0.11 leaves too few documents to rank trials (a 4 of its "
        "40 dev documents); it scores 10 of each such task (all where it has fewer)",
    )


# ---- bad keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fidelity", "message"),
    [
        (
            {"rungs": [0.5, 0.3, 1.0]},
            "search.fidelity.rungs: must be increasing, got 0.5 before 0.3",
        ),
        ({"rungs": [0.1, 0.5]}, "search.fidelity.rungs: the last rung must be 1.0"),
        ({"rungs": [1.0]}, "search.fidelity.rungs: needs at least two rungs"),
        ({"rungs": [0.1, 1.0], "eta": 1.5}, "search.fidelity.eta: input should be greater than"),
        ({"rungs": [0.1, 1.0], "speed": 2}, "search.fidelity.speed: unknown key"),
        (
            # 0.2 leaves 8 of the 40 dev documents: raised to 10, what 0.25 scores
            {"rungs": [0.2, 0.25, 1.0]},
            "study.yaml: search.fidelity.rungs: rungs 0.2 and 0.25 give task zoo_dec the same "
            "10 documents (40 dev documents, at least 10 per rung)",
        ),
        (
            {"rungs": [0.5, 0.51, 1.0]},
            "search.fidelity.rungs: rungs 0.5 and 0.51 give task zoo_dec the same 20 documents",
        ),
    ],
)
def test_bad_fidelity_is_one_error_line(
    tmp_path: Path,
    micro_zoo: Path,
    fidelity: dict[str, Any],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _study(tmp_path, micro_zoo, {"fidelity": fidelity})
    code = main(["search", str(path)])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("recycler: error: "), err
    assert message in lines[0]
    assert not (tmp_path / "study.db").exists()  # refused before anything was written


def test_budget_and_n_trials_together_are_refused(
    tmp_path: Path, micro_zoo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _study(tmp_path, micro_zoo, {"budget": 5, "n_trials": 10})
    assert main(["search", str(path)]) == 2
    assert "search.budget: give search.n_trials or search.budget, not both" in (
        capsys.readouterr().err
    )


def _study(tmp_path: Path, zoo: Path, search: dict[str, Any]) -> Path:
    data = yaml.safe_load((zoo / "study.yaml").read_text())
    data.update(
        name="mf",
        storage="sqlite:///study.db",
        pool={"base": str(zoo / "base"), "checkpoints": [str(zoo / "checkpoints" / "*")]},
    )
    data["eval"]["tasks_dir"] = str(zoo / "tasks")
    data["search"] = {**{k: v for k, v in data["search"].items() if k != "n_trials"}, **search}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- end to end: killed and resumed, on real Ray and lm-eval --------------------------


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="mf", storage=url).get_trials(deepcopy=False)


# The dev documents a trial holds after each rung: 5 tasks × 10, 20, 40.
RUNG_DOCS = [50, 100, 200]


def _between_rungs(state: str, attrs: dict[str, Any]) -> bool:
    """A trial promoted to a rung it has not scored any document of yet."""
    scores, rungs = attrs.get(TrialKey.DOC_SCORES), attrs.get(TrialKey.RUNGS)
    if state != "RUNNING" or not scores or not rungs or TrialKey.PROMOTED_TO not in attrs:
        return False
    top = max(int(k) for k in rungs)
    held = sum(len(e["ids"]) for e in scores.values())
    return attrs[TrialKey.PROMOTED_TO] > top and held == RUNG_DOCS[top]


def _locked_trials(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
    """Each trial's state and user attributes, read in Optuna's tables through the
    connection that holds the write lock (an Optuna storage would open its own)."""
    try:
        rows = db.execute(
            "SELECT t.number, t.state, a.key, a.value_json FROM trials t "
            "JOIN studies s ON s.study_id = t.study_id "
            "LEFT JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
            "WHERE s.study_name = 'mf'"
        ).fetchall()
    except sqlite3.OperationalError:  # Optuna's tables are not created yet
        return []
    trials: dict[int, tuple[str, dict[str, Any]]] = {}
    for number, state, key, value in rows:
        trials.setdefault(number, (state, {}))[1].update(
            {} if key is None else {key: json.loads(value)}
        )
    return list(trials.values())


def _kill_between_rungs(proc: subprocess.Popen[bytes], db_path: Path, err_path: Path) -> None:
    """SIGKILL the search once a trial is between rungs, deterministically.

    The test looks only while it holds the database's write lock (BEGIN IMMEDIATE): the
    driver cannot write meanwhile (it waits up to storage.SQLITE_LOCK_WAIT, 60 s; a look
    takes milliseconds), so when the test kills it, what the test saw is what the driver
    leaves. Between looks the lock is released until the driver has committed a write
    (PRAGMA data_version) and taken again within about a millisecond. A promoted trial
    stores its next rung only after that rung's evaluation, which starts once its
    promotion is stored, so the test holds the lock again while that evaluation runs: a
    promotion could pass unseen only if this process were kept off the CPU for a whole
    evaluation, and the first is always there to see (the uniform baseline climbs every
    rung). Neither the polling period nor the evaluation's speed decides any more.
    """

    def check_alive() -> None:
        if proc.poll() is not None:
            err = err_path.read_text()
            pytest.fail(f"the search ended with no trial seen between rungs: {err}")
        assert time.monotonic() < deadline, "no trial between rungs within 300 s"

    def data_version(db: sqlite3.Connection) -> int | None:
        """What changes when another connection commits; None while one is committing."""
        try:
            return int(db.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.OperationalError:  # locked: the driver is committing
            return None

    deadline = time.monotonic() + 300
    while not db_path.exists():
        check_alive()
        time.sleep(0.05)
    # timeout=0: a lock the driver holds is retried here at once, not after SQLite's
    # backoff; isolation_level=None: the transactions are the test's own statements.
    db = sqlite3.connect(f"file:{db_path}?mode=rw", uri=True, timeout=0, isolation_level=None)
    try:
        while True:
            check_alive()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:  # the driver is writing
                time.sleep(0.001)
                continue
            try:
                if any(_between_rungs(*t) for t in _locked_trials(db)):
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    return
                version = db.execute("PRAGMA data_version").fetchone()[0]
            finally:
                db.execute("ROLLBACK")
            while data_version(db) in (version, None):
                check_alive()
                time.sleep(0.001)
    finally:
        db.close()


def test_killed_and_resumed_multi_fidelity_search_loses_no_rung(
    tmp_path: Path, micro_zoo: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _study(
        tmp_path,
        micro_zoo,
        {
            "fidelity": {"rungs": [0.25, 0.5, 1.0], "eta": 2},
            "n_trials": 9,
            "baselines": ["uniform"],
        },
    )
    url = load_study_spec(path).storage_url
    err_path = tmp_path / "search.err"
    with err_path.open("wb") as err:  # a file, not a pipe: a full pipe would stall the driver
        proc = subprocess.Popen(
            [sys.executable, "-m", "recycler.cli", "search", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    try:
        _kill_between_rungs(proc, tmp_path / "study.db", err_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    before = {t.number: t for t in _trials(url)}
    climbing = [t for t in before.values() if _between_rungs(t.state.name, t.user_attrs)]
    assert climbing
    run_search(path)  # resume here, on the shared Ray
    after = {t.number: t for t in _trials(url)}
    for number, t in before.items():  # nothing finished is lost or changed
        if t.state.name in ("COMPLETE", "PRUNED"):
            assert after[number].state == t.state and after[number].user_attrs == t.user_attrs
    for stale in climbing:
        rerun = next(
            t for t in after.values() if t.user_attrs.get(TrialKey.RERUN_OF) == stale.number
        )
        carried = {int(k): v for k, v in stale.user_attrs[TrialKey.RUNGS].items()}
        finished = {int(k): v for k, v in rerun.user_attrs[TrialKey.RUNGS].items()}
        # The re-run went on from the rungs the killed trial had scored, their scores kept
        # as they were, to the rung it had been promoted to (not ranked again) ...
        assert all(finished[k] == v for k, v in carried.items())
        assert max(finished) >= stale.user_attrs[TrialKey.PROMOTED_TO] > max(carried)
        # ... scoring only the documents it had not.
        scored = RUNG_DOCS[max(finished)] - RUNG_DOCS[max(carried)]
        assert rerun.user_attrs[TrialKey.DOCS_SCORED] == scored
        assert rerun.user_attrs[TrialKey.DOC_SCORES] is None  # dropped once it finished
    view = view_of(optuna.load_study(study_name="mf", storage=url))
    assert view.pruned and view.complete
    # Pruned trials are not in the front, and cannot be exported.
    capsys.readouterr()
    assert main(["front", str(path), "--format", "json"]) == 0
    front = yaml.safe_load(capsys.readouterr().out)
    pruned = {r.number for r in view.pruned}
    assert not pruned & {m["trial"] for m in front["front"]}
    assert front["trials"]["pruned"] == len(pruned)
    assert front["cost"]["full_trial_equivalents"] == pytest.approx(cost_of(view)[0])
    victim = min(pruned)
    assert main(["export", str(path), str(tmp_path / "out"), "--trial", str(victim)]) == 2
    assert f"trial {victim} is pruned" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_document_values_are_stored_as_json() -> None:
    """f1's and mcc's per-document values are (gold, predicted class), the class a numpy
    integer: kept as plain JSON numbers."""
    import json

    import numpy as np

    from recycler.evaluate.results import doc_scores_of

    logged = [
        {"doc_id": d, "filter": "none", "metrics": ["f1"], "f1": (1, np.argmax([0.2, 0.8]))}
        for d in (4, 2)
    ]
    scores = doc_scores_of({"glue_like": logged})
    assert scores == {"glue_like": {"ids": [2, 4], "f1,none": [[1, 1], [1, 1]]}}
    assert json.loads(json.dumps(scores)) == scores


def test_a_resume_without_the_study_fidelity_is_refused(tmp_path: Path, micro_zoo: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_prepared(
        tmp_path, micro_zoo, {"fidelity": {"rungs": [0.25, 1.0], "eta": 2}, "baselines": []}
    )
    spec = prepared.spec.model_copy(
        update={"search": prepared.spec.search.model_copy(update={"fidelity": None})}
    )
    full = RungPlan.build(prepared.rungs.docs[-1], None, 0)
    with pytest.raises(RecyclerError, match="created with a different fidelity"):
        open_study(spec, study_fingerprint(spec, prepared.space, full), prepared.objectives)
