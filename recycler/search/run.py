"""The search: run, or resume, a study until it has spent its budget (`n_trials` finished
trials, or `search.budget` full-trial equivalents of documents scored).

The loop is ask → recipe → (cache or evaluator) → tell, with up to `capacity`
evaluations in flight and a new one started as soon as any finishes (no generation
barrier). With `search.fidelity` a trial is scored a rung at a time (`climb`): after each
rung it is told complete, pruned, or queued for the next rung, and a queued promotion
takes the next free worker first. With `eval.documents: stratified` a trial scores a
sample and is told an estimate (`stratified`). Every result is stored as it arrives, so
killing the process at any moment loses no completed trial and no finished rung; what it
leaves RUNNING is failed and re-run by the next start (`study.fail_stale_trials`), from
the rungs it finished. After the budget is spent the Pareto set is re-scored on test."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from recycler.errors import RecyclerError
from recycler.evaluate.evaluator import EvalResult, Evaluator, describe_failure
from recycler.merge.recipe import Recipe
from recycler.search import front as pareto
from recycler.search.analysis import analyse
from recycler.search.baselines import enqueue_greedy_step, settle_greedy
from recycler.search.budget import Budget, cost_of, n_counted, put_back
from recycler.search.cache import CachedResult, ResultCache
from recycler.search.climb import Climbs, Completed, Failed, Outcome, Pruned, scored_as_asked
from recycler.search.failures import FailureStreak
from recycler.search.preflight import preflight
from recycler.search.prepare import Prepared
from recycler.search.stored import (
    TrialWriter,
    baseline_of,
    rerun_attrs,
    stored_doc_scores,
    view_of,
    write_test_result,
)
from recycler.search.stratified import Scored, StratifiedTrials
from recycler.search.study import (
    duplicate_of,
    enqueue,
    fail_stale_trials,
    heartbeat,
    objective_values,
    owner_id,
    requeue_failed_baselines,
    told_values,
)

TEST_SPLIT = "test"
# A `search.budget` search stops after this many trials in a row that scored nothing.
FREE_TRIALS_LIMIT = 20
# Seconds between looks at the study while other processes hold the rest of the budget.
OTHERS_POLL = 2.0


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
class SearchProgress:
    """What `on_progress` is told after every change."""

    done: int  # counted trials
    budget: Budget
    cost: float  # full-trial equivalents spent
    hypervolume: float | None
    seconds_per_eval: float | None


# A trial's recipe: parsed (what the evaluator merges) and as stored (the cache's key).
TrialRecipe = tuple[Recipe, dict[str, Any]]


@dataclass
class _Flight:
    kind: str  # "dev": a trial of the search; "test": a front member re-scored
    number: int
    recipe: Recipe  # what the evaluator merges
    stored: dict[str, Any]  # the recipe as the trial stores it: the result cache's key
    trial: optuna.Trial | None
    started: float
    n_docs: int = 0  # the documents it scores
    # Multi-fidelity: the rung whose new documents it scores, and those documents.
    rung: int | None = None
    docs: dict[str, list[int]] | None = None


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
        # Multi-fidelity trials between rungs, and those promoted and waiting for a worker.
        self.climbs = Climbs(
            prepared.spec, prepared.objectives, prepared.rungs, prepared.suite, self.study
        )
        # eval.documents: stratified: what each trial scores, and its estimate.
        self.stratified = StratifiedTrials.of(prepared)
        # Trials finished in a row without scoring a document (cache hits, refused
        # proposals): they cost nothing, so a `search.budget` would never be spent.
        self._free_in_a_row = 0
        self.stop_reason: str | None = None
        self.failures = FailureStreak()
        self.requeued: list[int] = []  # failed baselines this start queued again

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
        (budget.budget_held, budget.cost_of), and once it is all taken this driver waits for
        the trials others still run, so that one of them failing as stale is run again here.
        """
        if isinstance(budget, int):
            budget = Budget(n_trials=budget)
        self.stale = fail_stale_trials(self.prepared.handle)
        self.requeued = requeue_failed_baselines(self.study)
        self._seed_cache()
        self._report(budget)
        with heartbeat(self._running):
            try:
                while True:
                    while self._n_flying("dev") < self.capacity:
                        self._stop_if_failing()
                        started = self._start_next(budget)
                        if started is None:
                            break
                        if not started:  # finished at once: a cache hit, refused weights
                            self._free_in_a_row += 1
                            self._report(budget)
                    if not self._flights:
                        if budget.spent(self.study) or self.stop_reason is not None:
                            break
                        self._await_others()
                        continue
                    for ticket, result in self.evaluator.wait():
                        self._finish(ticket, result)
                        self._report(budget)
                    self._stop_if_failing()
            except BaseException:
                self._abandon_flights("interrupted")
                raise
        settle_greedy(
            self.study, self.prepared.spec, self.prepared.space.names, self.prepared.objectives
        )

    def preflight(self, budget: Budget) -> None:
        """Before `run`: one document of every task scored with one checkpoint (`preflight`),
        unless the budget is spent already (a finished study starts no worker)."""
        if not budget.spent(self.study):
            preflight(self.prepared, self.evaluator)

    def _stop_if_failing(self) -> None:
        """Stop the search on failing trials (`failures`): what is in flight is re-run by
        the next start."""
        error = self.failures.stop_error(self.study)
        if error is not None:
            raise error

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
        with heartbeat(self._running):
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
                        try:
                            recipe = Recipe.from_dict(r.recipe, where=f"trial {r.number}")
                        except RecyclerError as exc:
                            self._store_test(r.number, EvalResult(ok=False, error=str(exc)))
                            continue
                        self._submit("test", r.number, (recipe, r.recipe), None, TEST_SPLIT)
                        count += 1
                    if self._flights:
                        for ticket, result in self.evaluator.wait():
                            self._finish(ticket, result)
            except BaseException:
                self._flights.clear()
                raise
        return count

    # ---- one trial ------------------------------------------------------------------
    def _carried_waiting(self) -> bool:
        """A queued re-run of a multi-fidelity trial carries the rungs it finished."""
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return any(stored_doc_scores(t.user_attrs) is not None for t in waiting)

    def _start_next(self, budget: Budget) -> bool | None:
        """Start a waiting promotion, else take a new trial and start it: True when in
        flight, False when it finished at once (cache hit, refused weights, a re-run that
        had finished its rung), None when the study's budget is all taken."""
        if self.climbs.promotions:
            number, rung = self.climbs.promotions.pop(0)
            self._submit_rung(number, rung)
            return True
        if budget.cost is not None and self._free_in_a_row >= FREE_TRIALS_LIMIT:
            self.stop_reason = (
                f"search.budget: the last {self._free_in_a_row} trials scored no document "
                "(cache hits or refused proposals); stopped before the budget was spent"
            )
            return None
        prepared = self.prepared
        enqueue_greedy_step(self.study, prepared.spec, prepared.space, prepared.objectives)
        # A re-run carrying finished rungs goes on whatever the budget, as a promotion
        # of this process's own does: the budget paid for those rungs already.
        carried = self.rungs.multi and self._carried_waiting()
        if not carried and budget.held(self.study, taken=False):  # spent: do not take a trial
            return None
        trial = self.study.ask()
        resumed = stored_doc_scores(trial.user_attrs) is not None
        # Counted after taking it (see budget.py).
        if not resumed and budget.held(self.study, taken=True):
            put_back(self.prepared.handle, trial.number)
            return None
        duplicate = duplicate_of(self.study, trial.number)
        if duplicate is not None:
            TrialWriter.of(trial).duplicate(duplicate)
            self._fail(trial, f"duplicate of trial {duplicate}: not run", streak=False)
            return False
        try:
            recipe = self._prepare_trial(trial)
        except Exception as exc:  # a proposal Optuna or the recipe refuses: fail it, go on
            self._fail(trial, describe_failure(exc))
            return False
        if recipe is None:
            return False
        if self.rungs.multi:
            return self._start_climb(trial, recipe)
        # Outside the try: a worker that cannot start is the run's error, not this trial's.
        docs = None if self.stratified is None else self.stratified.first_docs(trial)
        n_docs = self.rungs.full_docs if docs is None else sum(len(i) for i in docs.values())
        TrialWriter.of(trial).cost(0, n_docs)
        self._submit("dev", trial.number, recipe, trial, self.split, n_docs=n_docs, docs=docs)
        return True

    def _prepare_trial(self, trial: optuna.Trial) -> TrialRecipe | None:
        """Suggest, record and parse the trial's recipe (parsed once: the typed recipe is
        what the evaluator gets); None when the trial is already finished."""
        writer = TrialWriter.of(trial)
        writer.claim(self.owner)
        proposal = self.prepared.space.suggest(trial)
        writer.proposal(self.prepared.space.weights_by_checkpoint(proposal), proposal.tuned)
        if not proposal.is_finite():
            self._fail(trial, "non-finite weights")
            return None
        stored = self.prepared.space.recipe_dict(proposal)
        writer.recipe(stored)
        try:
            recipe = Recipe.from_dict(stored, where=f"trial {trial.number}")
        except RecyclerError as exc:
            self._fail(trial, str(exc))
            return None
        hit = self.cache.get(stored, self.split)
        if hit is not None:
            writer.cache_hit(hit.trial_number)
            result = EvalResult(ok=True, metrics=hit.metrics)
            self._complete(trial, stored, result, cache_hit=hit.trial_number)
            return None
        return recipe, stored

    def _submit(
        self,
        kind: str,
        number: int,
        recipe: TrialRecipe,
        trial: optuna.Trial | None,
        split: str,
        *,
        n_docs: int = 0,
        rung: int | None = None,
        docs: dict[str, list[int]] | None = None,
    ) -> None:
        ticket = self._next_ticket
        self._next_ticket += 1
        now = time.perf_counter()
        flight = _Flight(kind, number, recipe[0], recipe[1], trial, now, n_docs, rung, docs)
        with self._lock:
            # In flight before the evaluator starts: if it cannot, the trial is abandoned cleanly.
            self._flights[ticket] = flight
        evaluator = self.evaluator
        flight.started = time.perf_counter()  # the evaluator's start-up is not a trial's time
        evaluator.submit(ticket, flight.recipe, split, docs)

    def _finish(self, ticket: int, result: EvalResult) -> str:
        with self._lock:
            flight = self._flights.pop(ticket)
        if flight.kind == "test":
            self._store_test(flight.number, result)
            return "test"
        assert flight.trial is not None
        self._eval_seconds.append(time.perf_counter() - flight.started)
        self._free_in_a_row = 0
        climb = self.climbs.held.get(flight.number)
        if result.ok and flight.docs is not None and not scored_as_asked(result, flight.docs):
            result = EvalResult(
                ok=False,
                merge_seconds=result.merge_seconds,
                eval_seconds=result.eval_seconds,
                error="the evaluation returned scores of other documents than it was given",
            )
        if not result.ok:
            self.climbs.drop(flight.number)
            spent = (climb.docs_scored if climb is not None else 0) + flight.n_docs
            if self.stratified is not None:
                spent += self.stratified.drop(flight.number)
            TrialWriter.of(flight.trial).cost(spent)
            self._fail(flight.trial, result.error or "evaluation failed", result)
        elif climb is not None:
            self._act(self.climbs.rung_scored(flight.number, result))
        elif self.stratified is not None:
            self._stratified_scored(flight, result)
        else:
            self._complete(flight.trial, flight.stored, result, docs_scored=flight.n_docs)
        return "dev"

    def _stratified_scored(self, flight: _Flight, result: EvalResult) -> None:
        """Score the rest of the strata its sample flipped, or tell its estimate."""
        assert self.stratified is not None and flight.trial is not None
        step = self.stratified.scored(flight.trial, result)
        if isinstance(step, Scored):
            self._complete(flight.trial, flight.stored, step.result, docs_scored=step.docs_scored)
            return
        n_docs = sum(len(ids) for ids in step.values())
        TrialWriter.of(flight.trial).cost(self.stratified.docs_scored(flight.number), n_docs)
        trial_recipe = (flight.recipe, flight.stored)
        self._submit(
            "dev", flight.number, trial_recipe, flight.trial, self.split, n_docs=n_docs, docs=step
        )

    # ---- multi-fidelity: a trial a rung at a time (climb.py) ---------------------------
    def _start_climb(self, trial: optuna.Trial, recipe: TrialRecipe) -> bool:
        """Start a multi-fidelity trial at its next rung: True when an evaluation is in
        flight, False when a re-run's carried rungs decided it at once."""
        start = self.climbs.start(trial, *recipe)
        if isinstance(start, int):
            self._submit_rung(trial.number, start)
            return True
        self._act(start)
        return False

    def _submit_rung(self, number: int, rung: int) -> None:
        """Score the documents of `rung` that trial `number` has not scored yet."""
        docs = self.climbs.next_docs(number, rung)
        climb = self.climbs.held[number]
        n_docs = sum(len(ids) for ids in docs.values())
        self._submit(
            "dev",
            number,
            (climb.recipe, climb.stored),
            climb.trial,
            self.split,
            n_docs=n_docs,
            rung=rung,
            docs=docs,
        )

    def _act(self, outcome: Outcome) -> None:
        """Tell Optuna what a rung decided (a promoted trial waits in `climbs.promotions`)."""
        climb = outcome.climb
        if isinstance(outcome, Failed):
            self._fail(climb.trial, outcome.reason)
        elif isinstance(outcome, Completed):
            self._complete(climb.trial, climb.stored, outcome.result, docs_scored=climb.docs_scored)
        elif isinstance(outcome, Pruned):
            self.study.tell(climb.trial, state=TrialState.PRUNED)
            self.failures.succeeded()
            if self.on_trial is not None:
                self.on_trial(
                    FinishedTrial(
                        climb.trial.number,
                        baseline_of(climb.trial.user_attrs),
                        outcome.values,
                        merge_seconds=climb.merge_seconds,
                        eval_seconds=climb.eval_seconds,
                        pruned_at_fraction=outcome.fraction,
                    )
                )

    def _complete(
        self,
        trial: optuna.Trial,
        stored: dict[str, Any],
        result: EvalResult,
        *,
        cache_hit: int | None = None,
        docs_scored: int = 0,
    ) -> None:
        """Tell the trial its scores (`stored`: its recipe as stored, the cache's key);
        `cache_hit`: the trial whose scores these are;
        `docs_scored`: the documents its own evaluations scored."""
        values = objective_values(self.prepared.objectives, result.metrics)
        writer = TrialWriter.of(trial)
        writer.cost(docs_scored)
        if isinstance(values, str):
            self._fail(trial, values, result)
            return
        writer.scores(result.metrics, values)
        writer.timings(result.merge_seconds, result.eval_seconds)
        self.study.tell(trial, told_values(self.prepared.spec, self.prepared.objectives, values))
        self.failures.succeeded()
        merged = cache_hit is None
        if merged:
            self.cache.put(stored, self.split, CachedResult(trial.number, result.metrics))
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

    def _fail(
        self,
        trial: optuna.Trial,
        reason: str,
        result: EvalResult | None = None,
        *,
        streak: bool = True,
    ) -> None:
        """Tell the trial failed; `streak`: it counts among failures in a row (a duplicate
        dropped unrun does not)."""
        if streak:
            self.failures.failed(reason)
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
        values = objective_values(self.prepared.objectives, result.metrics)
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
        trials.update({n: c.trial for n, c in self.climbs.held.items()})
        self.climbs.held.clear()
        self.climbs.promotions.clear()
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

    def _running(self) -> list[optuna.Trial]:
        """The trials this process holds: in flight, or between rungs waiting for a worker."""
        with self._lock:
            trials = [f.trial for f in list(self._flights.values()) if f.trial is not None]
        return trials + [c.trial for c in list(self.climbs.held.values())]
