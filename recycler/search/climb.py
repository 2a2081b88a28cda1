"""The multi-fidelity climb: a trial scored a rung at a time (`search.fidelity`).

The driver starts a climbing trial here, hands each rung's result back, and acts on
the outcome it gets: fail the trial, complete it, queue it for the next rung, or prune
it. What a trial has scored is stored after every rung (its documents' scores and the
objectives on each rung they cover), so a re-run of a killed trial starts from the rungs
it finished. Who goes on is ASHA's rule (`fidelity.promotes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from recycler.config import StudySpec
from recycler.evaluate import doc_scores
from recycler.evaluate.evaluator import EvalResult
from recycler.evaluate.results import IDS, DocScores
from recycler.evaluate.tasks import SuiteRequest, load_suite
from recycler.merge.recipe import Recipe
from recycler.search.fidelity import RungPlan, promotes
from recycler.search.stored import (
    Objective,
    TrialWriter,
    baseline_of,
    promoted_to,
    stored_doc_scores,
    stored_rungs,
    view_of,
)
from recycler.search.study import objective_values, single_objective, told_maximize, told_values


@dataclass
class Climb:
    """A multi-fidelity trial the driver holds between rungs: what it has scored so far."""

    trial: optuna.Trial
    recipe: Recipe  # what the evaluator merges, rung after rung
    stored: dict[str, Any]  # the recipe as the trial stores it: the result cache's key
    scores: DocScores
    # The objectives on each rung its scores cover, each computed once (a re-run's carried).
    by_rung: dict[int, dict[str, float]]
    docs_scored: int = 0  # by this trial's own evaluations (carried rungs are not paid again)
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0


@dataclass(frozen=True)
class Failed:
    climb: Climb
    reason: str


@dataclass(frozen=True)
class Completed:
    """Its last rung done: `result` holds its metrics over every dev document."""

    climb: Climb
    result: EvalResult


@dataclass(frozen=True)
class Promoted:
    climb: Climb
    rung: int


@dataclass(frozen=True)
class Pruned:
    climb: Climb
    values: dict[str, float]  # its objectives on the rung it stopped at
    fraction: float  # that rung's fraction of the dev documents


Outcome = Failed | Completed | Promoted | Pruned


class Climbs:
    """The climbing trials one driver holds, and the promotions waiting for a worker (an
    idle worker serves a promotion before any new trial)."""

    def __init__(
        self,
        spec: StudySpec,
        objectives: list[Objective],
        rungs: RungPlan,
        suite: SuiteRequest,
        study: optuna.Study,
    ) -> None:
        self.spec = spec
        self.objectives = objectives
        self.rungs = rungs
        self.suite = suite
        self.study = study
        self.held: dict[int, Climb] = {}
        self.promotions: list[tuple[int, int]] = []  # (trial number, rung)

    def start(self, trial: optuna.Trial, recipe: Recipe, stored: dict[str, Any]) -> int | Outcome:
        """Hold a new trial, or a re-run with the rungs it carries: the rung it scores
        next, or its outcome when it had finished the rung it was promoted from."""
        attrs = trial.user_attrs  # a re-run's carried rungs are on the trial already
        scores = stored_doc_scores(attrs) or {}
        climb = Climb(trial, recipe, stored, scores, stored_rungs(attrs))
        self.held[trial.number] = climb
        reached = self.rungs.reached(climb.scores)
        promoted = promoted_to(attrs)
        target = 0 if promoted is None else promoted
        if reached is None or reached < target:
            return target
        return self.decide(climb)  # a re-run killed after scoring a rung, before going on

    def next_docs(self, number: int, rung: int) -> dict[str, list[int]]:
        """The documents of `rung` that trial `number` has not scored yet; recorded as the
        documents it holds of the budget."""
        climb = self.held[number]
        docs = self.rungs.missing(climb.scores, rung)
        TrialWriter.of(climb.trial).cost(climb.docs_scored, sum(len(i) for i in docs.values()))
        return docs

    def rung_scored(self, number: int, result: EvalResult) -> Outcome:
        """Add one rung's evaluation to what the trial has scored, and decide."""
        climb = self.held[number]
        assert result.doc_scores is not None
        climb.scores = doc_scores.merged(climb.scores, result.doc_scores)
        climb.docs_scored += doc_scores.n_docs(result.doc_scores)
        climb.merge_seconds += result.merge_seconds
        climb.eval_seconds += result.eval_seconds
        return self.decide(climb)

    def drop(self, number: int) -> Climb | None:
        return self.held.pop(number, None)

    def decide(self, climb: Climb) -> Outcome:
        """Store what the trial has scored; then complete it (its last rung done), promote
        it (queued for the next idle worker) or prune it (ASHA, `search.fidelity`).
        The trial is held no more unless promoted."""
        trial, suite = climb.trial, load_suite(self.suite)
        writer = TrialWriter.of(trial)
        writer.timings(climb.merge_seconds, climb.eval_seconds)
        writer.cost(climb.docs_scored)
        by_rung = climb.by_rung
        reached = self.rungs.reached(climb.scores)
        assert reached is not None
        for rung in range(reached + 1):
            if rung in by_rung:
                continue
            part = doc_scores.restricted(climb.scores, self.rungs.docs[rung])
            assert part is not None
            values = objective_values(self.objectives, doc_scores.aggregate(suite, part))
            if isinstance(values, str):
                self.held.pop(trial.number)
                return Failed(climb, values)
            by_rung[rung] = values
        writer.rungs(climb.scores, by_rung)
        if single_objective(self.spec):
            # Optuna takes intermediate values of a single-valued study only: TPE ranks the
            # pruned trials by them, and the dashboard plots them.
            told = told_values(self.spec, self.objectives, by_rung[reached])
            trial.report(told[0], step=reached)
        if reached == self.rungs.last:
            self.held.pop(trial.number)
            metrics = doc_scores.aggregate(suite, climb.scores)
            writer.drop_doc_scores()
            return Completed(
                climb,
                EvalResult(
                    ok=True,
                    metrics=metrics,
                    merge_seconds=climb.merge_seconds,
                    eval_seconds=climb.eval_seconds,
                ),
            )
        # A baseline goes through every rung whatever its rank: it is scored at full
        # fidelity, in the same evaluations per rung as every trial that reaches the top
        # (a task's few-shot examples are drawn per evaluation).
        maximize = told_maximize(self.spec, self.objectives)
        if baseline_of(trial.user_attrs) is not None or promotes(
            trial.number,
            self._rung_vectors(reached),
            maximize,
            self.rungs.eta,
            self.spec.search.seed,
        ):
            writer.promoted(reached + 1)
            self.promotions.append((trial.number, reached + 1))
            return Promoted(climb, reached + 1)
        self.held.pop(trial.number)
        writer.drop_doc_scores()
        return Pruned(climb, by_rung[reached], self.rungs.fractions[reached])

    def _rung_vectors(self, rung: int) -> dict[int, list[float]]:
        """Every trial that has finished `rung`, with its objectives there (as Optuna is
        told them: the macro-average for a single-objective study). A stale trial is left
        out: its re-run carries the same scores.

        Baselines are in, as ASHA ranks every trial that finished the rung: they are merges
        of the same pool scored on the same documents, so a trial they beat there is not
        worth more documents; and a baseline among the best ⌊n/eta⌋ takes a place ASHA would
        have given it anyway (only one below them is promoted beyond ASHA's share)."""
        out: dict[int, list[float]] = {}
        for record in view_of(self.study).trials:
            values = record.rungs.get(rung)
            if values is None or record.stale or record.duplicate_of is not None:
                continue
            if any(o.name not in values for o in self.objectives):
                continue
            out[record.number] = told_values(self.spec, self.objectives, values)
        return out


def scored_as_asked(result: EvalResult, docs: dict[str, list[int]] | None) -> bool:
    """The evaluation returned each asked document's scores, and no others."""
    if result.doc_scores is None or docs is None:
        return False
    return {t: e[IDS] for t, e in result.doc_scores.items()} == {
        t: sorted(i) for t, i in docs.items()
    }
