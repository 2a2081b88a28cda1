"""Stratified trials (`eval.documents: stratified`): which documents a trial scores, and
its estimated scores (`evaluate.strata`).

The checkpoint baselines (`singles`) score every dev document and keep each document's
scores on their trial. Once all of them have finished, the study's strata are built from
those scores and stored (`StudyKey.STRATA`): every later trial scores the same seeded
sample (every contested document, `eval.agreed_sample` of each agreed stratum: the
trials are compared on the same documents), then, where its sample flipped too many
agreed documents, the rest of those strata, and is told the stratified estimate. A trial
started before the strata exist scores every dev document.

A trial's estimate is stored with its standard error per objective
(`TrialKey.DEV_STDERR`) and the documents it scored (`TrialKey.SCORED_DOCS`). A killed
trial is re-run from its first evaluation: it is one trial's documents at most.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.evaluate import doc_scores
from recycler.evaluate.evaluator import EvalResult, lookup_metric
from recycler.evaluate.results import DocScores
from recycler.evaluate.strata import Strata, TaskPlan
from recycler.evaluate.tasks import SuiteRequest, load_suite
from recycler.search.baselines import GREEDY, is_checkpoint_baseline
from recycler.search.prepare import Prepared
from recycler.search.stored import (
    Objective,
    TrialWriter,
    baseline_of,
    stored_scored_docs,
    stored_strata,
    write_strata,
)


@dataclass
class _Scoring:
    """A trial between its evaluations: what it has scored so far."""

    sampled: bool  # scored on the strata's sample (False: every dev document)
    scores: DocScores
    docs_scored: int = 0
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    completed: bool = False  # its flipped strata were scored in full


@dataclass(frozen=True)
class Scored:
    """A trial's last evaluation done: its (estimated) metrics, and the documents its own
    evaluations scored."""

    result: EvalResult
    docs_scored: int


class StratifiedTrials:
    """The stratified trials one driver runs: what each scores, and their estimates."""

    def __init__(
        self,
        spec: StudySpec,
        objectives: list[Objective],
        plan: TaskPlan,
        suite: SuiteRequest,
        study: optuna.Study,
    ) -> None:
        self.fraction = spec.eval.agreed_sample
        self.dissent = spec.eval.sampled_dissent
        self.seed = f"{spec.eval.split_seed}:strata"
        self.objectives = objectives
        self.plan = plan
        self.suite = suite
        self.study = study
        self.strata: Strata | None = None
        self._sample: dict[str, list[int]] | None = None
        self._scoring: dict[int, _Scoring] = {}

    def first_docs(self, trial: optuna.Trial) -> dict[str, list[int]]:
        """The documents `trial` scores first: every dev document for a checkpoint
        baseline, a greedy-soup step or before the strata exist, else the strata's sample."""
        # A greedy-soup step is scored in full too: its keep-or-drop decision compares it
        # with the checkpoints' exact scores.
        label = baseline_of(trial.user_attrs)
        full = label is not None and (is_checkpoint_baseline(label) or label == GREEDY)
        strata = None if full else self._strata()
        if strata is None:
            docs = self.plan.dev_ids
        else:
            if self._sample is None:
                self._sample = strata.sample(self.fraction, self.seed)
            docs = self._sample
        self._scoring[trial.number] = _Scoring(strata is not None, {})
        return docs

    @classmethod
    def of(cls, prepared: Prepared) -> StratifiedTrials | None:
        """A study's stratified trials; None for a study that scores every document."""
        if prepared.task_plan is None:
            return None
        return cls(
            prepared.spec,
            prepared.objectives,
            prepared.task_plan,
            prepared.suite,
            prepared.handle.study,
        )

    def docs_scored(self, number: int) -> int:
        scoring = self._scoring.get(number)
        return 0 if scoring is None else scoring.docs_scored

    def drop(self, number: int) -> int:
        """Forget a trial that failed; the documents it had scored."""
        scoring = self._scoring.pop(number, None)
        return 0 if scoring is None else scoring.docs_scored

    def scored(self, trial: optuna.Trial, result: EvalResult) -> Scored | dict[str, list[int]]:
        """Add one evaluation's documents: the documents the trial scores next (the rest
        of the agreed strata its sample flipped too often), or its final scores (what it
        scored is stored on it)."""
        scoring = self._scoring[trial.number]
        assert result.doc_scores is not None
        scoring.scores = doc_scores.merged(scoring.scores, result.doc_scores)
        scoring.docs_scored += doc_scores.n_docs(result.doc_scores)
        scoring.merge_seconds += result.merge_seconds
        scoring.eval_seconds += result.eval_seconds
        if scoring.sampled and not scoring.completed:
            assert self.strata is not None
            more = self.strata.flipped(scoring.scores)
            if more:
                scoring.completed = True
                return more
        del self._scoring[trial.number]
        suite = load_suite(self.suite)
        writer = TrialWriter.of(trial)
        writer.scored_docs(scoring.scores)
        # A sample of every document (agreed_sample 1) is no estimate.
        if scoring.sampled and scoring.docs_scored < sum(map(len, self.plan.dev_ids.values())):
            assert self.strata is not None
            estimate = self.strata.estimate(suite, scoring.scores)
            metrics = estimate.metrics
            writer.dev_stderr(
                {
                    o.name: lookup_metric(estimate.stderr.get(o.task, {}), o.metric) or 0.0
                    for o in self.objectives
                }
            )
        else:
            metrics = doc_scores.aggregate(suite, scoring.scores)
        return Scored(
            EvalResult(
                ok=True,
                metrics=metrics,
                merge_seconds=scoring.merge_seconds,
                eval_seconds=scoring.eval_seconds,
            ),
            scoring.docs_scored,
        )

    def _strata(self) -> Strata | None:
        """The study's strata: stored, or built now that every checkpoint baseline has
        finished; None while one still runs (or waits)."""
        if self.strata is not None:
            return self.strata
        stored = stored_strata(self.study.user_attrs)
        if stored is not None:
            self.strata = Strata.from_record(stored)
            return self.strata
        scores: dict[str, DocScores] = {}
        waiting: set[str] = set()
        for trial in self.study.get_trials(deepcopy=False):
            label = baseline_of(trial.user_attrs)
            if label is None or not is_checkpoint_baseline(label):
                continue
            kept = stored_scored_docs(trial.user_attrs)
            if trial.state == TrialState.COMPLETE and kept is not None:
                scores[label] = kept
            elif trial.state in (TrialState.WAITING, TrialState.RUNNING):
                waiting.add(label)
        if waiting - set(scores):
            return None
        if len(scores) < 2:
            raise RecyclerError(
                "eval.documents: stratified needs at least two checkpoints scored on every "
                f"dev document (the singles baselines); {len(scores)} did"
            )
        self.strata = Strata.build(self.plan, scores, self.dissent)
        write_strata(self.study, self.strata.record())
        return self.strata
