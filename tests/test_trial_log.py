"""The line per finished trial that a search prints when its stderr is not a terminal."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from test_search_front import ToyEvaluator, toy_study, weights_of

from recycler.commands.search import trial_line
from recycler.errors import RecyclerError
from recycler.evaluate.evaluator import EvalResult
from recycler.search.budget import cost_of, n_counted
from recycler.search.run import FinishedTrial, SearchDriver
from recycler.search.stored import view_of


class HalfFailingEvaluator(ToyEvaluator):
    """The toy problem, but every evaluation whose first weight exceeds 0.5 fails."""

    def wait(self) -> list[tuple[int, EvalResult]]:
        recipe = self.pending[-1][1]
        out = super().wait()
        if weights_of(recipe)[0] > 0.5:
            return [
                (
                    ticket,
                    EvalResult(
                        ok=False,
                        error="CUDA out of memory\nsecond line",
                        merge_seconds=0.01,
                        eval_seconds=0.5,
                    ),
                )
                for ticket, _ in out
            ]
        return out


def test_one_line_per_search_trial_with_what_the_study_stored(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    told: list[FinishedTrial] = []
    with SearchDriver(
        toy_study(tmp_path), HalfFailingEvaluator, capacity=2, on_trial=told.append
    ) as driver:
        driver.run(8)
        study = driver.study
    trials = study.get_trials()
    assert sorted(t.number for t in told) == [t.number for t in trials]
    assert [t.number for t in trials] == list(range(len(trials)))
    # Failed trials count toward no n_trials: 8 with a result, and the failed ones besides.
    assert n_counted(study) == 8 and len(trials) > 8
    assert {t.state.name for t in trials} == {"COMPLETE", "FAIL"}
    for t in told:
        stored = trials[t.number]
        line = trial_line(t)
        assert line.startswith(f"trial {t.number} [{stored.user_attrs.get('baseline', 'search')}] ")
        if stored.state.name == "COMPLETE":
            assert t.values == {"quality": stored.values[0], "cost": stored.values[1]}
            assert f"complete: quality={stored.values[0]:.6g} cost={stored.values[1]:.6g}" in line
            assert line.endswith("· merge 0.01 s · eval 0.02 s")
        else:
            assert t.values is None
            assert line.endswith("failed: CUDA out of memory · merge 0.01 s · eval 0.50 s")
            assert stored.user_attrs["fail_reason"].startswith("CUDA out of memory")


def test_a_cache_hit_names_the_trial_it_reused() -> None:
    line = trial_line(FinishedTrial(9, None, {"q": 0.5}, cache_hit=3))
    assert line == "trial 9 [search] complete (scores of trial 3, same recipe): q=0.5"


class FailingEvaluator(ToyEvaluator):
    """Every evaluation fails with one same error, as a task that cannot run makes it."""

    def wait(self) -> list[tuple[int, EvalResult]]:
        return [
            (ticket, EvalResult(ok=False, error="AssertionError: max_gen_toks does not fit"))
            for ticket, _ in super().wait()
        ]


def test_failing_trials_stop_the_search_spend_nothing_and_a_fixed_rerun_has_every_baseline(
    tmp_path: Path,
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_study(tmp_path)  # baselines: uniform and 3 singles, enqueued
    with (
        SearchDriver(prepared, FailingEvaluator, capacity=2) as driver,
        pytest.raises(RecyclerError) as caught,
    ):
        driver.run(6)
    message = str(caught.value)
    assert message.startswith("search: stopped after its first 3 trials all failed the same way")
    assert message.endswith(": AssertionError: max_gen_toks does not fit")
    study = prepared.handle.study
    assert n_counted(study) == 0 and cost_of(view_of(study)) == (0.0, 0.0)
    states = [t.state.name for t in study.get_trials()]
    assert "COMPLETE" not in states and states.count("FAIL") >= 3
    # Fixed: the next start queues the failed baselines again and completes 6 trials with
    # every baseline among them.
    with SearchDriver(prepared, ToyEvaluator, capacity=2) as driver:
        driver.run(6)
    assert len(driver.requeued) >= 2
    complete = [r for r in view_of(study).trials if r.state == "COMPLETE"]
    assert len(complete) == n_counted(study) == 6
    assert {r.baseline for r in complete} >= {"uniform", "single:c0", "single:c1", "single:c2"}
