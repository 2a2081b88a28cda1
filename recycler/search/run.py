"""`recycler search`: run, or resume, a study until it holds `n_trials` finished trials.

The loop is ask → recipe → (cache or evaluator) → tell, with up to `capacity` trials in
flight and a new one asked for as soon as any finishes (no generation barrier). Every
trial is told as soon as its result arrives, so killing the process at any moment loses
no completed trial; what it leaves RUNNING is failed and re-run by the next start
(`study.fail_stale_trials`). After the budget is spent the Pareto set is re-scored on
the test split.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from recycler.config import StudySpec, load_study_spec
from recycler.errors import RecyclerError
from recycler.search import front as pareto
from recycler.search.baselines import GREEDY, fixed_baselines, greedy_state, members_weights
from recycler.search.cache import CachedResult, ResultCache
from recycler.search.evaluator import EvalResult, Evaluator, lookup_metric
from recycler.search.space import SearchSpace
from recycler.search.study import (
    ATTR_GREEDY,
    ATTR_SEEDED,
    HEARTBEAT_INTERVAL,
    TEST_PREFIX,
    Objective,
    StudyHandle,
    counts_toward_budget,
    enqueue,
    fail_stale_trials,
    macro_average,
    open_study,
    owner_id,
    rerun_attrs,
    resolve_objectives,
    single_objective,
    view_of,
)

TEST_SPLIT = "test"


@dataclass
class Prepared:
    """A study ready to run: the pool indexed, the space built, the study opened."""

    spec: StudySpec
    pool: Any  # recycler.pool.Pool
    space: SearchSpace
    objectives: list[Objective]
    handle: StudyHandle
    notes: list[str]


def study_fingerprint(spec: StudySpec, space: SearchSpace) -> dict[str, Any]:
    """The parts of the study file a resumed study must share with the stored one."""
    return {**space.fingerprint(), "split": spec.eval.split, "limit": spec.eval.limit}


def objective_directions(spec: StudySpec) -> Callable[[str, str], bool | None]:
    """lm-eval's higher_is_better for (task, metric), after checking every objective exists.

    Builds the task suite once (lm-eval indexes the folder and loads the data), so a
    misspelt task or metric fails here, before a cluster starts.
    """
    from recycler.evaluate.tasks import metric_directions

    tasks = list(dict.fromkeys(o.task for o in spec.objectives))
    try:
        with _quiet_lm_eval():
            directions = metric_directions(spec.tasks_dir, tasks)
    except RecyclerError as exc:
        raise RecyclerError(f"objectives: {exc}") from None
    for i, o in enumerate(spec.objectives):
        known = directions.get(o.task, {})
        if o.metric not in known and o.metric.split(",", 1)[0] not in known:
            raise RecyclerError(
                f"objectives.{i}.metric: task {o.task} has no metric {o.metric!r} "
                f"(it has: {', '.join(sorted(known)) or 'none'})"
            )

    def lookup(task: str, metric: str) -> bool | None:
        known = directions.get(task, {})
        return known.get(metric, known.get(metric.split(",", 1)[0]))

    return lookup


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Building tasks logs lm-eval's defaults and draws datasets' bars: not news to a user."""
    import io
    import logging

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def prepare(spec: StudySpec, *, create: bool = True) -> Prepared:
    """Index the pool (headers only), build the space, open or create the study, seed it."""
    from recycler.pool import Pool

    # Optuna logs every trial at INFO; the progress bar and `recycler front` say it better.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pool = Pool.open(spec.pool.checkpoints, spec.base_path, root=spec.root)
    space = SearchSpace.from_pool(spec, pool)
    objectives = resolve_objectives(spec, objective_directions(spec))
    handle = open_study(spec, study_fingerprint(spec, space), objectives, create=create)
    notes: list[str] = []
    study = handle.study
    if create and not study.user_attrs.get(ATTR_SEEDED):
        baselines, notes = fixed_baselines(space.names, pool.checkpoints, spec.search.baselines)
        for b in baselines:
            params = space.encode(b.weights)
            if params is None:
                notes.append(
                    f"baseline {b.label} skipped: its weights are outside the search space"
                )
                continue
            # skip_if_exists: a start killed while enqueuing re-enqueues only what is missing.
            enqueue(study, params, {"baseline": b.label}, skip_if_exists=True)
        study.set_user_attr(ATTR_SEEDED, True)
    return Prepared(spec, pool, space, objectives, handle, notes)


@dataclass
class _Flight:
    kind: str  # "dev": a trial of the search; "test": a front member re-scored
    number: int
    recipe: dict[str, Any]
    trial: optuna.Trial | None
    started: float


class SearchDriver:
    """The ask/tell loop over an Evaluator. Knows nothing of Ray or tensors."""

    def __init__(
        self,
        prepared: Prepared,
        make_evaluator: Callable[[], Evaluator],
        *,
        capacity: int,
        on_progress: Callable[[int, int, float | None, float | None], None] | None = None,
    ) -> None:
        self.p = prepared
        self.study = prepared.handle.study
        self.make_evaluator = make_evaluator
        self.capacity = max(1, capacity)
        self.on_progress = on_progress
        self.cache = ResultCache()
        self.owner = owner_id()
        self.split = prepared.spec.eval.split
        self._evaluator: Evaluator | None = None
        self._flights: dict[int, _Flight] = {}
        self._next_ticket = 0
        self._lock = threading.Lock()
        self._trial_seconds: list[float] = []
        self.stale: list[int] = []

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
    def run(self, target: int) -> None:
        self.stale = fail_stale_trials(self.p.handle)
        self._seed_cache()
        done = sum(counts_toward_budget(t) for t in self.study.get_trials(deepcopy=False))
        self._report(done, target)
        with self._heartbeat():
            try:
                while True:
                    while (
                        self._n_flying("dev") < self.capacity
                        and done + self._n_flying("dev") < target
                    ):
                        if self._start_next():
                            done += 1
                            self._report(done, target)
                    if not self._flights:
                        break
                    for ticket, result in self.evaluator.wait():
                        if self._finish(ticket, result) == "dev":
                            done += 1
                            self._report(done, target)
            except BaseException:
                self._abandon_flights("interrupted")
                raise
        self._settle_greedy()

    def rescore_front(self) -> int:
        """Score the Pareto set (chosen on dev) and the baselines on the test split.

        Returns how many evaluations ran (cache hits excluded).
        """
        from recycler.search.analysis import analyse

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
    def _start_next(self) -> bool:
        """Ask for a trial and start it; True when it finished at once (cache hit, bad weights)."""
        self._maybe_enqueue_greedy()
        trial = self.study.ask()
        try:
            recipe = self._prepare_trial(trial)
        except Exception as exc:  # a proposal Optuna or the recipe refuses: fail it, go on
            from recycler.cluster.worker import describe_failure

            self._fail(trial, describe_failure(exc))
            return True
        if recipe is None:
            return True
        # Outside the try: a worker that cannot start is the run's error, not this trial's.
        self._submit("dev", trial.number, recipe, trial, self.split)
        return False

    def _prepare_trial(self, trial: optuna.Trial) -> dict[str, Any] | None:
        """Suggest, record and check the trial's recipe; None when it is already finished."""
        trial.set_user_attr("owner", self.owner)
        trial.set_user_attr("heartbeat", time.time())
        proposal = self.p.space.suggest(trial)
        trial.set_user_attr("weights", _json_safe(self.p.space.weights_by_checkpoint(proposal)))
        if not proposal.is_finite():
            self._fail(trial, "non-finite weights")
            return None
        recipe = self.p.space.recipe_dict(proposal)
        trial.set_user_attr("recipe", recipe)
        try:
            from recycler.merge.recipe import Recipe

            Recipe.from_dict(recipe, where=f"trial {trial.number}")
        except RecyclerError as exc:
            self._fail(trial, str(exc))
            return None
        hit = self.cache.get(recipe, self.split)
        if hit is not None:
            trial.set_user_attr("cache_hit", hit.trial_number)
            self._complete(trial, recipe, EvalResult(ok=True, metrics=hit.metrics), cached=True)
            return None
        return recipe

    def _submit(
        self, kind: str, number: int, recipe: dict[str, Any], trial: optuna.Trial | None, split: str
    ) -> None:
        ticket = self._next_ticket
        self._next_ticket += 1
        flight = _Flight(kind, number, recipe, trial, time.perf_counter())
        with self._lock:
            # In flight before the evaluator starts: if it cannot, the trial is abandoned cleanly.
            self._flights[ticket] = flight
        evaluator = self.evaluator
        flight.started = time.perf_counter()  # the evaluator's start-up is not a trial's time
        evaluator.submit(ticket, recipe, split)

    def _finish(self, ticket: int, result: EvalResult) -> str:
        with self._lock:
            flight = self._flights.pop(ticket)
        if flight.kind == "test":
            self._store_test(flight.number, result)
            return "test"
        assert flight.trial is not None
        self._trial_seconds.append(time.perf_counter() - flight.started)
        if not result.ok:
            self._fail(flight.trial, result.error or "evaluation failed", result)
        else:
            self._complete(flight.trial, flight.recipe, result, cached=False)
        return "dev"

    def _objective_values(self, metrics: dict[str, dict[str, float]]) -> dict[str, float] | str:
        values: dict[str, float] = {}
        for o in self.p.objectives:
            task_metrics = metrics.get(o.task)
            if task_metrics is None:
                return f"lm-eval returned no results for task {o.task} (got: {', '.join(sorted(metrics)) or 'none'})"
            value = lookup_metric(task_metrics, o.metric)
            if value is None:
                return f"task {o.task} has no metric {o.metric} (got: {', '.join(sorted(task_metrics))})"
            if (
                not isinstance(value, int | float)
                or value != value
                or value in (float("inf"), float("-inf"))
            ):
                return f"objective {o.name} is not a finite number: {value!r}"
            values[o.name] = float(value)
        return values

    def _complete(
        self, trial: optuna.Trial, recipe: dict[str, Any], result: EvalResult, *, cached: bool
    ) -> None:
        values = self._objective_values(result.metrics)
        if isinstance(values, str):
            self._fail(trial, values, result)
            return
        trial.set_user_attr("dev", _json_safe(result.metrics))
        trial.set_user_attr("objectives", values)
        trial.set_user_attr("merge_seconds", round(result.merge_seconds, 3))
        trial.set_user_attr("eval_seconds", round(result.eval_seconds, 3))
        told = (
            [macro_average(values, self.p.objectives)]
            if single_objective(self.p.spec)
            else [values[o.name] for o in self.p.objectives]
        )
        self.study.tell(trial, told)
        if not cached:
            self.cache.put(recipe, self.split, CachedResult(trial.number, result.metrics))

    def _fail(self, trial: optuna.Trial, reason: str, result: EvalResult | None = None) -> None:
        trial.set_user_attr("fail_reason", reason[:2000])
        if result is not None:
            trial.set_user_attr("merge_seconds", round(result.merge_seconds, 3))
            trial.set_user_attr("eval_seconds", round(result.eval_seconds, 3))
        self.study.tell(trial, state=TrialState.FAIL)

    def _store_test(self, number: int, result: EvalResult) -> None:
        entry: dict[str, Any]
        if result.ok:
            values = self._objective_values(result.metrics)
            entry = (
                {"error": values}
                if isinstance(values, str)
                else {"objectives": values, "metrics": _json_safe(result.metrics)}
            )
        else:
            entry = {"error": (result.error or "evaluation failed")[:2000]}
        self.study.set_user_attr(f"{TEST_PREFIX}{number}", entry)

    def _abandon_flights(self, reason: str) -> None:
        """Fail what is in flight and queue it again, so the next start re-runs it."""
        with self._lock:
            flights = list(self._flights.values())
            self._flights.clear()
        for f in flights:
            if f.kind != "dev" or f.trial is None:
                continue
            try:
                f.trial.set_user_attr("fail_reason", reason)
                f.trial.set_user_attr("stale", True)
                self.study.tell(f.trial, state=TrialState.FAIL)
                enqueue(self.study, dict(f.trial.params), rerun_attrs(f.trial))
            except Exception:  # the storage may be what failed; the next start cleans up
                pass

    # ---- baselines that depend on scores --------------------------------------------
    def _maybe_enqueue_greedy(self) -> None:
        if "greedy" not in self.p.spec.search.baselines or ATTR_GREEDY in self.study.user_attrs:
            return
        if self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return
        state = greedy_state(view_of(self.study).trials, self.p.space.names, self.p.objectives)
        if state.done:
            self._settle_greedy(state.soup_trial)
            return
        if state.blocked or state.next_members is None:
            return
        params = self.p.space.encode(members_weights(self.p.space.names, state.next_members))
        if params is None:
            self.study.set_user_attr(ATTR_GREEDY, None)
            return
        enqueue(self.study, params, {"baseline": GREEDY, "greedy_members": state.next_members})

    def _settle_greedy(self, soup_trial: int | None = None) -> None:
        """Record the greedy soup's trial once every step has a score."""
        if "greedy" not in self.p.spec.search.baselines or ATTR_GREEDY in self.study.user_attrs:
            return
        if soup_trial is None:
            state = greedy_state(view_of(self.study).trials, self.p.space.names, self.p.objectives)
            if not state.done:
                return
            soup_trial = state.soup_trial
        self.study.set_user_attr(ATTR_GREEDY, soup_trial)

    # ---- bookkeeping ----------------------------------------------------------------
    def _seed_cache(self) -> None:
        for r in view_of(self.study).trials:
            if r.state == "COMPLETE" and r.recipe is not None and r.metrics and r.cache_hit is None:
                self.cache.put(r.recipe, self.split, CachedResult(r.number, r.metrics))

    def _n_flying(self, kind: str) -> int:
        return sum(1 for f in self._flights.values() if f.kind == kind)

    def _report(self, done: int, target: int) -> None:
        if self.on_progress is None:
            return
        view = view_of(self.study)
        hv = None
        vectors = [v for r in view.complete if (v := r.vector(view.objectives)) is not None]
        if vectors:
            hv = pareto.hypervolume(vectors, pareto.nadir(vectors, view.maximize), view.maximize)
        per_trial = (
            sum(self._trial_seconds) / len(self._trial_seconds) if self._trial_seconds else None
        )
        self.on_progress(done, target, hv, per_trial)

    @contextmanager
    def _heartbeat(self) -> Iterator[None]:
        """Stamp the running trials every HEARTBEAT_INTERVAL s (seen by a start on another host)."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_INTERVAL):
                with self._lock:
                    trials = [f.trial for f in self._flights.values() if f.trial is not None]
                for t in trials:
                    with contextlib.suppress(Exception):  # finished meanwhile: nothing to stamp
                        t.set_user_attr("heartbeat", time.time())

        thread = threading.Thread(target=beat, name="recycler-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)


def _json_safe(value: Any) -> Any:
    """User attributes are JSON: NaN/inf become None, tuples lists."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def run_search(study_path: Path, n_trials: int | None) -> None:
    """`recycler search STUDY.yaml [--n-trials N]`."""
    from rich.console import Console

    spec = load_study_spec(study_path)
    target = spec.search.n_trials if n_trials is None else n_trials
    if target < 1:
        raise RecyclerError(f"--n-trials: must be at least 1, got {target}")
    console = Console(stderr=True)
    prepared = prepare(spec)
    for note in prepared.notes:
        console.print(f"[yellow]note:[/] {note}")
    search_and_rescore(prepared, target, console)
    from recycler.search.show import summary_line

    print(summary_line(view_of(prepared.handle.study), prepared.spec))


def search_and_rescore(prepared: Prepared, target: int, console: Any) -> None:
    """Run the search to `target` trials with a progress bar, then re-score the front on test."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from recycler.cluster.evaluator import RayEvaluator

    spec = prepared.spec
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trials · HV {task.fields[hv]} · {task.fields[spt]} s/trial"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task_id = progress.add_task(f"study {spec.name}", total=target, hv="-", spt="-")

        def on_progress(done: int, total: int, hv: float | None, per_trial: float | None) -> None:
            progress.update(
                task_id,
                completed=min(done, total),
                total=total,
                hv="-" if hv is None else f"{hv:.4g}",
                spt="-" if per_trial is None else f"{per_trial:.1f}",
            )

        with SearchDriver(
            prepared,
            lambda: RayEvaluator.from_spec(spec, prepared.pool, prepared.objectives),
            capacity=spec.cluster.eval_workers,
            on_progress=on_progress,
        ) as driver:
            driver.run(target)
            if driver.stale:
                console.print(
                    f"note: failed and re-ran trial(s) left running by a killed process: {driver.stale}"
                )
            progress.update(task_id, description=f"study {spec.name}: test split")
            driver.rescore_front()
