"""The search: run, or resume, a study until it has spent its budget (`n_trials` finished
trials, or `search.budget` full-trial equivalents of documents scored).

The loop is ask → recipe → (cache or evaluator) → tell, with up to `capacity`
evaluations in flight and a new one started as soon as any finishes (no generation
barrier). With `search.fidelity` a trial is scored a rung at a time (`fidelity`): after
each rung it is told complete, pruned, or queued for the next rung, and a queued
promotion takes the next free worker before any new trial. Every result is stored as
soon as it arrives, so killing the process at any moment loses no completed trial and
no finished rung; what it leaves RUNNING is failed and re-run by the next start
(`study.fail_stale_trials`), from the rungs it finished. After the budget is spent the
Pareto set is re-scored on the test split.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.evaluate import doc_scores
from recycler.evaluate.evaluator import EvalResult, Evaluator, describe_failure, lookup_metric
from recycler.evaluate.results import IDS, DocScores
from recycler.evaluate.tasks import (
    SuiteRequest,
    UnknownTaskError,
    load_suite,
    metric_info,
    suite_request,
)
from recycler.merge.recipe import Recipe
from recycler.pool import Pool
from recycler.samplers import SAMPLERS
from recycler.search import front as pareto
from recycler.search.analysis import analyse
from recycler.search.baselines import GREEDY, fixed_baselines, greedy_state, members_weights
from recycler.search.cache import CachedResult, ResultCache
from recycler.search.fidelity import RungPlan, promotes
from recycler.search.space import SearchSpace
from recycler.search.stored import (
    Objective,
    TrialWriter,
    baseline_of,
    baselines_enqueued,
    greedy_soup_settled,
    mark_baselines_enqueued,
    promoted_to,
    queued_attrs,
    rerun_attrs,
    settle_greedy_soup,
    stored_doc_scores,
    stored_rungs,
    view_of,
    write_dev_docs,
    write_test_result,
)
from recycler.search.study import (
    HEARTBEAT_INTERVAL,
    StudyHandle,
    budget_held,
    cost_of,
    duplicate_of,
    enqueue,
    fail_stale_trials,
    macro_average,
    n_counted,
    open_study,
    owner_id,
    put_back,
    resolve_objectives,
    single_objective,
)

TEST_SPLIT = "test"
# A `search.budget` search stops after this many trials in a row that scored nothing.
FREE_TRIALS_LIMIT = 20
# Seconds between looks at the study while other processes hold the rest of the budget.
OTHERS_POLL = 2.0


@dataclass
class Prepared:
    """A study ready to run: the pool indexed, the space built, the study opened."""

    spec: StudySpec
    pool: Pool
    space: SearchSpace
    objectives: list[Objective]
    handle: StudyHandle
    notes: list[str]
    rungs: RungPlan  # which documents a trial scores, rung by rung (one rung: all of dev)
    suite: SuiteRequest  # the tasks scored (what per-document scores are combined by)


def study_fingerprint(spec: StudySpec, space: SearchSpace, rungs: RungPlan) -> dict[str, Any]:
    """The parts of the study file a resumed study must share with the stored one."""
    return {
        **space.fingerprint(),
        "split": spec.eval.split,
        "limit": spec.eval.limit,
        # None without search.fidelity: what a study made before the key existed reads as.
        "fidelity": rungs.record(),
    }


def objective_directions(
    spec: StudySpec,
) -> tuple[Callable[[str, str], bool | None], dict[str, dict[str, Any]], RungPlan]:
    """lm-eval's higher_is_better for (task, metric), after checking every objective exists,
    each task's dev/test documents (`TaskSuite.split_records`), and the rungs' documents.

    Builds the task suite once (lm-eval indexes the folders and loads the data), so a
    misspelt task, metric or filter, a missing local dataset or a split too small fails
    here, before a cluster starts.
    """
    request = suite_request(spec)
    try:
        info = metric_info(request)
        suite = load_suite(request)
        records = suite.split_records()
        dev_ids = suite.doc_ids(spec.eval.split, spec.eval.limit)
    except UnknownTaskError as exc:
        i = next(i for i, o in enumerate(spec.objectives) if o.task == exc.name)
        raise RecyclerError(f"objectives.{i}.task: {exc}") from None
    except RecyclerError as exc:
        raise RecyclerError(
            f"objectives: {exc}" if not str(exc).startswith("eval.") else str(exc)
        ) from None
    for i, o in enumerate(spec.objectives):
        known = info[o.task]
        metric, _, filt = o.metric.partition(",")
        if o.metric not in known.directions and metric not in known.directions:
            raise RecyclerError(
                f"objectives.{i}.metric: task {o.task} has no metric {metric!r} "
                f"(it has: {', '.join(sorted(known.directions)) or 'none'})"
            )
        if filt and filt not in known.filters:
            raise RecyclerError(
                f"objectives.{i}.metric: task {o.task} has no filter {filt!r} "
                f"(it has: {', '.join(known.filters)})"
            )

    def lookup(task: str, metric: str) -> bool | None:
        known = info[task].directions
        return known.get(metric, known.get(metric.split(",", 1)[0]))

    rungs = RungPlan.build(dev_ids, spec.search.fidelity, spec.eval.split_seed)
    return lookup, records, rungs


def prepare(spec: StudySpec, *, create: bool = True) -> Prepared:
    """Index the pool (headers only), build the space, open or create the study, enqueue
    the baselines."""
    pool = Pool.open(spec.pool.checkpoints, spec.base_path, root=spec.root)
    space = SearchSpace.from_pool(spec, pool)
    directions, doc_split, rungs = objective_directions(spec)
    objectives = resolve_objectives(spec, directions)
    handle = open_study(
        spec, study_fingerprint(spec, space, rungs), objectives, create=create, doc_split=doc_split
    )
    notes: list[str] = []
    study = handle.study
    if create and not baselines_enqueued(study.user_attrs):
        baselines, notes = fixed_baselines(
            space.names, pool.checkpoints, spec.search.enqueued_baselines
        )
        for b in baselines:
            params = space.encode(b.weights)
            if params is None:
                notes.append(
                    f"baseline {b.label} skipped: its weights are outside the search space"
                )
                continue
            # skip_if_exists: a start killed while enqueuing re-enqueues only what is missing.
            enqueue(study, params, queued_attrs(params, baseline=b.label), skip_if_exists=True)
        mark_baselines_enqueued(study)
    if spec.search.fidelity is not None and SAMPLERS[spec.search.sampler].ignores_pruned:
        notes.append(
            f"search.fidelity with sampler {spec.search.sampler}: it learns from complete "
            "trials only, a few of a multi-fidelity search's; tpe learns from pruned ones too"
        )
    if create and view_of(study).dev_docs != rungs.full_docs:
        write_dev_docs(study, rungs.full_docs)
    return Prepared(spec, pool, space, objectives, handle, notes, rungs, suite_request(spec))


@dataclass(frozen=True)
class FinishedTrial:
    """What a search trial ended with, as it was told: its objective values, or the reason
    it failed."""

    number: int
    baseline: str | None  # the baseline an enqueued trial is (GREEDY: a greedy step)
    values: dict[str, float] | None  # None when it failed
    failure: str | None = None
    merge_seconds: float | None = None  # None when nothing was merged (a cache hit, a refusal)
    eval_seconds: float | None = None
    cache_hit: int | None = None  # the trial whose identical recipe's scores it reused
    # Multi-fidelity: the rung (its fraction of the dev documents) it was pruned at, its
    # `values` being its scores there; None for a trial told complete or failed.
    pruned_at_fraction: float | None = None


@dataclass(frozen=True)
class Budget:
    """Where a search stops: at `n_trials` counted trials, or once `cost` full-trial
    equivalents of documents are spent (`search.budget`)."""

    n_trials: int | None = None
    cost: float | None = None

    @classmethod
    def of(cls, spec: StudySpec, n_trials: int | None = None) -> Budget:
        """The study file's budget; `n_trials` (the command line's) replaces it."""
        if n_trials is not None:
            return cls(n_trials=n_trials)
        if spec.search.budget is not None:
            return cls(cost=spec.search.budget)
        return cls(n_trials=spec.search.n_trials)


@dataclass(frozen=True)
class SearchProgress:
    """What `on_progress` is told after every change."""

    done: int  # counted trials
    budget: Budget
    cost: float  # full-trial equivalents spent
    hypervolume: float | None
    seconds_per_eval: float | None


@dataclass
class _Flight:
    kind: str  # "dev": a trial of the search; "test": a front member re-scored
    number: int
    recipe: dict[str, Any]
    trial: optuna.Trial | None
    started: float
    n_docs: int = 0  # the documents it scores
    # Multi-fidelity: the rung whose new documents it scores, and those documents.
    rung: int | None = None
    docs: dict[str, list[int]] | None = None


@dataclass
class _Climb:
    """A multi-fidelity trial this driver holds between rungs: what it has scored so far."""

    trial: optuna.Trial
    recipe: dict[str, Any]
    scores: DocScores
    # The objectives on each rung its scores cover, each computed once (a re-run's carried).
    by_rung: dict[int, dict[str, float]]
    docs_scored: int = 0  # by this trial's own evaluations (carried rungs are not paid again)
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0


class SearchDriver:
    """The ask/tell loop over an Evaluator. Knows nothing of Ray or tensors."""

    def __init__(
        self,
        prepared: Prepared,
        make_evaluator: Callable[[], Evaluator],
        *,
        capacity: int,
        on_progress: Callable[[SearchProgress], None] | None = None,
        on_trial: Callable[[FinishedTrial], None] | None = None,
    ) -> None:
        """`on_progress` after every change of the count; `on_trial` with every search
        trial told (complete, pruned or failed)."""
        self.prepared = prepared
        self.study = prepared.handle.study
        self.make_evaluator = make_evaluator
        self.capacity = max(1, capacity)
        self.on_progress = on_progress
        self.on_trial = on_trial
        self.cache = ResultCache()
        self.owner = owner_id()
        self.split = prepared.spec.eval.split
        self._evaluator: Evaluator | None = None
        self._flights: dict[int, _Flight] = {}
        self._next_ticket = 0
        self._lock = threading.Lock()
        self._eval_seconds: list[float] = []
        self.stale: list[int] = []
        self.rungs = prepared.rungs
        # Multi-fidelity trials between rungs, and those promoted and waiting for a worker
        # (taken before any new trial: an idle worker serves a promotion first).
        self._climbs: dict[int, _Climb] = {}
        self._promotions: list[tuple[int, int]] = []  # (trial number, rung)
        # Trials finished in a row without scoring a document (cache hits, refused
        # proposals): they cost nothing, so a `search.budget` would never be spent.
        self._free_in_a_row = 0
        self.stop_reason: str | None = None

    # ---- lifecycle ------------------------------------------------------------------
    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = self.make_evaluator()
        return self._evaluator

    def close(self) -> None:
        if self._evaluator is not None:
            self._evaluator.close()
            self._evaluator = None

    def __enter__(self) -> SearchDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the search -----------------------------------------------------------------
    def run(self, budget: Budget | int) -> None:
        """Run trials until the study has spent `budget` (an int: that many counted trials),
        whoever runs them.

        Other processes may drive the same study: the budget is the study's
        (study.budget_held, study.cost_of), and once it is all taken this driver waits for
        the trials others still run, so that one of them failing as stale is run again here.
        """
        if isinstance(budget, int):
            budget = Budget(n_trials=budget)
        self.stale = fail_stale_trials(self.prepared.handle)
        self._seed_cache()
        self._report(budget)
        with self._heartbeat():
            try:
                while True:
                    while self._n_flying("dev") < self.capacity:
                        started = self._start_next(budget)
                        if started is None:
                            break
                        if not started:  # finished at once: a cache hit, refused weights
                            self._free_in_a_row += 1
                            self._report(budget)
                    if not self._flights:
                        if self._spent(budget) or self.stop_reason is not None:
                            break
                        self._await_others()
                        continue
                    for ticket, result in self.evaluator.wait():
                        self._finish(ticket, result)
                        self._report(budget)
            except BaseException:
                self._abandon_flights("interrupted")
                raise
        self._settle_greedy()

    def _await_others(self) -> None:
        """Nothing of ours in flight, budget left but held by others' RUNNING trials (or a
        trial put back a moment ago): pause, then fail what a dead process left running.
        Bounded: a live process finishes its trials; a dead one's are failed as stale (at
        once on this host, after STALE_AFTER s without heartbeat on another)."""
        time.sleep(random.uniform(0.5, 1.5) * OTHERS_POLL)
        self.stale.extend(fail_stale_trials(self.prepared.handle))

    def rescore_front(self) -> int:
        """Score the Pareto set (chosen on dev) and the baselines on the test split.

        Returns how many evaluations ran (cache hits excluded).
        """
        if self.split == TEST_SPLIT:
            return 0
        view = view_of(self.study)
        summary = analyse(view, TEST_SPLIT)
        wanted = {m.record.number: m.record for m in [*summary.members, *summary.baselines]}
        # A member whose test scoring failed before is tried again (a worker may have died).
        todo = [r for _, r in sorted(wanted.items()) if r.test_objectives is None]
        # Earlier test scores of an identical recipe are reused like dev scores are.
        for r in view.trials:
            if r.recipe is not None and r.test_metrics is not None:
                self.cache.put(r.recipe, TEST_SPLIT, CachedResult(r.number, r.test_metrics))
        count = 0
        with self._heartbeat():
            try:
                pending = list(todo)
                while pending or self._flights:
                    while pending and len(self._flights) < self.capacity:
                        r = pending.pop(0)
                        assert r.recipe is not None
                        hit = self.cache.get(r.recipe, TEST_SPLIT)
                        if hit is not None:
                            self._store_test(r.number, EvalResult(ok=True, metrics=hit.metrics))
                            continue
                        self._submit("test", r.number, r.recipe, None, TEST_SPLIT)
                        count += 1
                    if self._flights:
                        for ticket, result in self.evaluator.wait():
                            self._finish(ticket, result)
            except BaseException:
                self._flights.clear()
                raise
        return count

    # ---- one trial ------------------------------------------------------------------
    def _spent(self, budget: Budget) -> bool:
        """The study has spent its budget (finished trials only)."""
        if budget.cost is not None:
            return cost_of(view_of(self.study))[0] >= budget.cost
        assert budget.n_trials is not None
        return n_counted(self.study) >= budget.n_trials

    def _carried_waiting(self) -> bool:
        """A queued re-run of a multi-fidelity trial carries the rungs it finished."""
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return any(stored_doc_scores(t.user_attrs) is not None for t in waiting)

    def _held(self, budget: Budget, *, taken: bool) -> bool:
        """The budget is all held by finished and running trials. `taken`: counted after
        taking a trial, which holds one of n_trials already (a cost budget counts the
        documents of evaluations in flight, which a trial just taken has none of yet)."""
        if budget.cost is not None:
            return cost_of(view_of(self.study))[1] >= budget.cost
        assert budget.n_trials is not None
        held = budget_held(self.study)
        return held > budget.n_trials if taken else held >= budget.n_trials

    def _start_next(self, budget: Budget) -> bool | None:
        """Start a waiting promotion, else take a new trial and start it: True when in
        flight, False when it finished at once (cache hit, refused weights, a re-run that
        had finished its rung), None when the study's budget is all taken."""
        if self._promotions:
            number, rung = self._promotions.pop(0)
            self._submit_rung(number, rung)
            return True
        if budget.cost is not None and self._free_in_a_row >= FREE_TRIALS_LIMIT:
            self.stop_reason = (
                f"search.budget: the last {self._free_in_a_row} trials scored no document "
                "(cache hits or refused proposals); stopped before the budget was spent"
            )
            return None
        self._maybe_enqueue_greedy()
        # A re-run carrying finished rungs goes on whatever the budget, as a promotion
        # of this process's own does: the budget paid for those rungs already.
        carried = self.rungs.multi and self._carried_waiting()
        if not carried and self._held(budget, taken=False):  # spent: do not take a trial
            return None
        trial = self.study.ask()
        resumed = stored_doc_scores(trial.user_attrs) is not None
        # Counted after taking it (see study.py, budget).
        if not resumed and self._held(budget, taken=True):
            put_back(self.prepared.handle, trial.number)
            return None
        duplicate = duplicate_of(self.study, trial.number)
        if duplicate is not None:
            TrialWriter.of(trial).duplicate(duplicate)
            self._fail(trial, f"duplicate of trial {duplicate}: not run")
            return False
        try:
            recipe = self._prepare_trial(trial)
        except Exception as exc:  # a proposal Optuna or the recipe refuses: fail it, go on
            self._fail(trial, describe_failure(exc))
            return False
        if recipe is None:
            return False
        if self.rungs.multi:
            return self._climb(trial, recipe)
        # Outside the try: a worker that cannot start is the run's error, not this trial's.
        TrialWriter.of(trial).cost(0, self.rungs.full_docs)
        self._submit("dev", trial.number, recipe, trial, self.split, n_docs=self.rungs.full_docs)
        return True

    def _prepare_trial(self, trial: optuna.Trial) -> dict[str, Any] | None:
        """Suggest, record and check the trial's recipe; None when it is already finished."""
        writer = TrialWriter.of(trial)
        writer.claim(self.owner)
        proposal = self.prepared.space.suggest(trial)
        writer.proposal(self.prepared.space.weights_by_checkpoint(proposal))
        if not proposal.is_finite():
            self._fail(trial, "non-finite weights")
            return None
        recipe = self.prepared.space.recipe_dict(proposal)
        writer.recipe(recipe)
        try:
            Recipe.from_dict(recipe, where=f"trial {trial.number}")
        except RecyclerError as exc:
            self._fail(trial, str(exc))
            return None
        hit = self.cache.get(recipe, self.split)
        if hit is not None:
            writer.cache_hit(hit.trial_number)
            result = EvalResult(ok=True, metrics=hit.metrics)
            self._complete(trial, recipe, result, cache_hit=hit.trial_number)
            return None
        return recipe

    def _submit(
        self,
        kind: str,
        number: int,
        recipe: dict[str, Any],
        trial: optuna.Trial | None,
        split: str,
        *,
        n_docs: int = 0,
        rung: int | None = None,
        docs: dict[str, list[int]] | None = None,
    ) -> None:
        ticket = self._next_ticket
        self._next_ticket += 1
        flight = _Flight(kind, number, recipe, trial, time.perf_counter(), n_docs, rung, docs)
        with self._lock:
            # In flight before the evaluator starts: if it cannot, the trial is abandoned cleanly.
            self._flights[ticket] = flight
        evaluator = self.evaluator
        flight.started = time.perf_counter()  # the evaluator's start-up is not a trial's time
        evaluator.submit(ticket, recipe, split, docs)

    def _finish(self, ticket: int, result: EvalResult) -> str:
        with self._lock:
            flight = self._flights.pop(ticket)
        if flight.kind == "test":
            self._store_test(flight.number, result)
            return "test"
        assert flight.trial is not None
        self._eval_seconds.append(time.perf_counter() - flight.started)
        self._free_in_a_row = 0
        climb = self._climbs.get(flight.number)
        if result.ok and climb is not None and not _scored_as_asked(result, flight.docs):
            result = EvalResult(
                ok=False,
                merge_seconds=result.merge_seconds,
                eval_seconds=result.eval_seconds,
                error="the evaluation returned scores of other documents than it was given",
            )
        if not result.ok:
            self._climbs.pop(flight.number, None)
            spent = (climb.docs_scored if climb is not None else 0) + flight.n_docs
            TrialWriter.of(flight.trial).cost(spent)
            self._fail(flight.trial, result.error or "evaluation failed", result)
        elif climb is not None:
            self._rung_finished(climb, result)
        else:
            self._complete(flight.trial, flight.recipe, result, docs_scored=flight.n_docs)
        return "dev"

    # ---- multi-fidelity: a trial a rung at a time -------------------------------------
    def _climb(self, trial: optuna.Trial, recipe: dict[str, Any]) -> bool:
        """Start a multi-fidelity trial at the first rung, or a re-run from the rungs it
        carries. True when an evaluation is in flight."""
        attrs = trial.user_attrs  # a re-run's carried rungs are on the trial already
        climb = _Climb(trial, recipe, stored_doc_scores(attrs) or {}, stored_rungs(attrs))
        self._climbs[trial.number] = climb
        reached = self.rungs.reached(climb.scores)
        promoted = promoted_to(attrs)
        target = 0 if promoted is None else promoted
        if reached is None or reached < target:
            self._submit_rung(trial.number, target)
            return True
        self._decide(climb)  # a re-run killed after scoring a rung, before going on
        return False

    def _submit_rung(self, number: int, rung: int) -> None:
        """Score the documents of `rung` that trial `number` has not scored yet."""
        climb = self._climbs[number]
        docs = self.rungs.missing(climb.scores, rung)
        n_docs = sum(len(ids) for ids in docs.values())
        TrialWriter.of(climb.trial).cost(climb.docs_scored, n_docs)
        self._submit(
            "dev",
            number,
            climb.recipe,
            climb.trial,
            self.split,
            n_docs=n_docs,
            rung=rung,
            docs=docs,
        )

    def _rung_finished(self, climb: _Climb, result: EvalResult) -> None:
        assert result.doc_scores is not None
        climb.scores = doc_scores.merged(climb.scores, result.doc_scores)
        climb.docs_scored += doc_scores.n_docs(result.doc_scores)
        climb.merge_seconds += result.merge_seconds
        climb.eval_seconds += result.eval_seconds
        self._decide(climb)

    def _decide(self, climb: _Climb) -> None:
        """Store what the trial has scored; then complete it (its last rung done), promote
        it (queued for the next idle worker) or prune it (ASHA, `search.fidelity`)."""
        trial, suite = climb.trial, load_suite(self.prepared.suite)
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
            values = self._objective_values(doc_scores.aggregate(suite, part))
            if isinstance(values, str):
                self._climbs.pop(trial.number)
                self._fail(trial, values)
                return
            by_rung[rung] = values
        writer.rungs(climb.scores, by_rung)
        if single_objective(self.prepared.spec):
            # Optuna takes intermediate values of a single-valued study only: TPE ranks the
            # pruned trials by them, and the dashboard plots them.
            trial.report(self._told(by_rung[reached])[0], step=reached)
        if reached == self.rungs.last:
            self._climbs.pop(trial.number)
            metrics = doc_scores.aggregate(suite, climb.scores)
            result = EvalResult(
                ok=True,
                metrics=metrics,
                merge_seconds=climb.merge_seconds,
                eval_seconds=climb.eval_seconds,
            )
            writer.drop_doc_scores()
            self._complete(trial, climb.recipe, result, docs_scored=climb.docs_scored)
            return
        # A baseline goes through every rung whatever its rank: it is scored at full
        # fidelity, in the same evaluations per rung as every trial that reaches the top
        # (a task's few-shot examples are drawn per evaluation).
        if baseline_of(trial.user_attrs) is not None or promotes(
            trial.number, self._rung_vectors(reached), self._maximize, self.rungs.eta
        ):
            writer.promoted(reached + 1)
            self._promotions.append((trial.number, reached + 1))
            return
        self._climbs.pop(trial.number)
        writer.drop_doc_scores()
        self.study.tell(trial, state=TrialState.PRUNED)
        if self.on_trial is not None:
            self.on_trial(
                FinishedTrial(
                    trial.number,
                    baseline_of(trial.user_attrs),
                    by_rung[reached],
                    merge_seconds=climb.merge_seconds,
                    eval_seconds=climb.eval_seconds,
                    pruned_at_fraction=self.rungs.fractions[reached],
                )
            )

    @property
    def _maximize(self) -> list[bool]:
        if single_objective(self.prepared.spec):
            return [True]
        return [o.maximize for o in self.prepared.objectives]

    def _rung_vectors(self, rung: int) -> dict[int, list[float]]:
        """Every trial that has finished `rung`, with its objectives there (as Optuna is
        told them: the macro-average for a single-objective study). A stale trial is left
        out: its re-run carries the same scores."""
        out: dict[int, list[float]] = {}
        for record in view_of(self.study).trials:
            values = record.rungs.get(rung)
            if values is None or record.stale or record.duplicate_of is not None:
                continue
            if any(o.name not in values for o in self.prepared.objectives):
                continue
            out[record.number] = self._told(values)
        return out

    def _told(self, values: dict[str, float]) -> list[float]:
        """What Optuna is told for these objective values: the macro-average for a
        single-valued study, else one value per objective."""
        if single_objective(self.prepared.spec):
            return [macro_average(values, self.prepared.objectives)]
        return [values[o.name] for o in self.prepared.objectives]

    def _objective_values(self, metrics: dict[str, dict[str, float]]) -> dict[str, float] | str:
        values: dict[str, float] = {}
        for o in self.prepared.objectives:
            task_metrics = metrics.get(o.task)
            if task_metrics is None:
                got = ", ".join(sorted(metrics)) or "none"
                return f"lm-eval returned no results for task {o.task} (got: {got})"
            value = lookup_metric(task_metrics, o.metric)
            if value is None:
                got = ", ".join(sorted(task_metrics))
                return f"task {o.task} has no metric {o.metric} (got: {got})"
            if (
                not isinstance(value, int | float)
                or value != value
                or value in (float("inf"), float("-inf"))
            ):
                return f"objective {o.name} is not a finite number: {value!r}"
            values[o.name] = float(value)
        return values

    def _complete(
        self,
        trial: optuna.Trial,
        recipe: dict[str, Any],
        result: EvalResult,
        *,
        cache_hit: int | None = None,
        docs_scored: int = 0,
    ) -> None:
        """Tell the trial its scores; `cache_hit`: the trial whose scores these are;
        `docs_scored`: the documents its own evaluations scored."""
        values = self._objective_values(result.metrics)
        writer = TrialWriter.of(trial)
        writer.cost(docs_scored)
        if isinstance(values, str):
            self._fail(trial, values, result)
            return
        writer.scores(result.metrics, values)
        writer.timings(result.merge_seconds, result.eval_seconds)
        self.study.tell(trial, self._told(values))
        merged = cache_hit is None
        if merged:
            self.cache.put(recipe, self.split, CachedResult(trial.number, result.metrics))
        if self.on_trial is not None:
            self.on_trial(
                FinishedTrial(
                    trial.number,
                    baseline_of(trial.user_attrs),
                    values,
                    merge_seconds=result.merge_seconds if merged else None,
                    eval_seconds=result.eval_seconds if merged else None,
                    cache_hit=cache_hit,
                )
            )

    def _fail(self, trial: optuna.Trial, reason: str, result: EvalResult | None = None) -> None:
        writer = TrialWriter.of(trial)
        writer.failure(reason)
        if result is not None:
            writer.timings(result.merge_seconds, result.eval_seconds)
        self.study.tell(trial, state=TrialState.FAIL)
        if self.on_trial is not None:
            self.on_trial(
                FinishedTrial(
                    trial.number,
                    baseline_of(trial.user_attrs),
                    None,
                    failure=reason,
                    merge_seconds=None if result is None else result.merge_seconds,
                    eval_seconds=None if result is None else result.eval_seconds,
                )
            )

    def _store_test(self, number: int, result: EvalResult) -> None:
        if not result.ok:
            write_test_result(self.study, number, error=result.error or "evaluation failed")
            return
        values = self._objective_values(result.metrics)
        if isinstance(values, str):
            write_test_result(self.study, number, error=values)
        else:
            write_test_result(self.study, number, objectives=values, metrics=result.metrics)

    def _abandon_flights(self, reason: str) -> None:
        """Fail what is in flight or between rungs and queue it again, so the next start
        re-runs it (from the rungs it finished)."""
        with self._lock:
            trials = {f.number: f.trial for f in self._flights.values() if f.kind == "dev"}
            self._flights.clear()
        trials.update({n: c.trial for n, c in self._climbs.items()})
        self._climbs.clear()
        self._promotions.clear()
        for trial in trials.values():
            if trial is None:
                continue
            try:
                TrialWriter.of(trial).failure(reason, stale=True)
                self.study.tell(trial, state=TrialState.FAIL)
                params = dict(trial.params)
                enqueue(self.study, params, rerun_attrs(trial.number, trial.user_attrs, params))
            except Exception:  # the storage may be what failed; the next start cleans up
                pass

    # ---- baselines that depend on scores --------------------------------------------
    def _maybe_enqueue_greedy(self) -> None:
        if not self._greedy_pending():
            return
        if self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return
        state = greedy_state(
            view_of(self.study).trials, self.prepared.space.names, self.prepared.objectives
        )
        if state.done:
            self._settle_greedy(state.soup_trial)
            return
        if state.blocked or state.next_members is None:
            return
        params = self.prepared.space.encode(
            members_weights(self.prepared.space.names, state.next_members)
        )
        if params is None:
            settle_greedy_soup(self.study, None)
            return
        enqueue(
            self.study,
            params,
            queued_attrs(params, baseline=GREEDY, greedy_members=state.next_members),
        )

    def _settle_greedy(self, soup_trial: int | None = None) -> None:
        """Record the greedy soup's trial once every step has a score."""
        if not self._greedy_pending():
            return
        if soup_trial is None:
            state = greedy_state(
                view_of(self.study).trials, self.prepared.space.names, self.prepared.objectives
            )
            if not state.done:
                return
            soup_trial = state.soup_trial
        settle_greedy_soup(self.study, soup_trial)

    def _greedy_pending(self) -> bool:
        """The study asks for the greedy soup and has not settled it yet."""
        return "greedy" in self.prepared.spec.search.baselines and not greedy_soup_settled(
            self.study.user_attrs
        )

    # ---- bookkeeping ----------------------------------------------------------------
    def _seed_cache(self) -> None:
        for r in view_of(self.study).trials:
            if r.state == "COMPLETE" and r.recipe is not None and r.metrics and r.cache_hit is None:
                self.cache.put(r.recipe, self.split, CachedResult(r.number, r.metrics))

    def _n_flying(self, kind: str) -> int:
        return sum(1 for f in self._flights.values() if f.kind == kind)

    def _report(self, budget: Budget) -> None:
        if self.on_progress is None:
            return
        view = view_of(self.study)
        done = n_counted(self.study)
        spent = cost_of(view)[0]
        hv = None
        vectors = [v for r in view.complete if (v := r.vector(view.objectives)) is not None]
        if vectors:
            hv = pareto.hypervolume(vectors, pareto.nadir(vectors, view.maximize), view.maximize)
        per_trial = (
            sum(self._eval_seconds) / len(self._eval_seconds) if self._eval_seconds else None
        )
        self.on_progress(SearchProgress(done, budget, spent, hv, per_trial))

    @contextmanager
    def _heartbeat(self) -> Iterator[None]:
        """Stamp the running trials every HEARTBEAT_INTERVAL s (seen by a start on another host)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_INTERVAL):
                with self._lock:
                    trials = [f.trial for f in list(self._flights.values()) if f.trial is not None]
                    # A trial between rungs waits for a worker: it is still this process's.
                    trials += [c.trial for c in list(self._climbs.values())]
                for t in trials:
                    with contextlib.suppress(Exception):  # finished meanwhile: nothing to stamp
                        TrialWriter.of(t).heartbeat()

        thread = threading.Thread(target=beat, name="recycler-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)


def _scored_as_asked(result: EvalResult, docs: dict[str, list[int]] | None) -> bool:
    """The evaluation returned each asked document's scores, and no others."""
    if result.doc_scores is None or docs is None:
        return False
    return {t: e[IDS] for t, e in result.doc_scores.items()} == {
        t: sorted(i) for t, i in docs.items()
    }
