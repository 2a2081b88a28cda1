"""The Optuna study behind a study file: create or resume it, fail what a dead process left
running, and load it back as records. What it stores, and under which keys, is `stored`'s.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.evaluate.evaluator import lookup_metric
from recycler.samplers import effective_seed, make_sampler
from recycler.search.storage import (
    masked,
    no_such_study,
    open_existing,
    open_storage,
    shown,
    study_names,
)
from recycler.search.stored import (
    Objective,
    StudyView,
    TrialWriter,
    baselines_enqueued,
    identity_written,
    read_trial,
    rerun_attrs,
    stored_doc_split,
    stored_objectives,
    stored_space,
    view_of,
    write_doc_split,
    write_identity,
)

MACRO = "macro"
# A trial of another host is presumed dead once its heartbeat is this old (seconds).
HEARTBEAT_INTERVAL = 30.0
STALE_AFTER = 300.0
# A trial nobody stamped as its owner within this many seconds of its start was orphaned.
OWNERLESS_AFTER = 60.0


def resolve_objectives(
    spec: StudySpec, higher_is_better: Callable[[str, str], bool | None]
) -> list[Objective]:
    """Objectives with directions: the study file's, else lm-eval's higher_is_better."""
    out = []
    for i, o in enumerate(spec.objectives):
        if o.direction is not None:
            maximize = o.direction == "maximize"
        else:
            hib = higher_is_better(o.task, o.metric)
            if hib is None:
                raise RecyclerError(
                    f"objectives.{i}.direction: lm-eval gives no higher_is_better for "
                    f"{o.task}/{o.metric}; set direction: maximize or minimize"
                )
            maximize = bool(hib)
        out.append(Objective(o.name, o.task, o.metric, maximize))
    return out


def macro_average(values: dict[str, float], objectives: Sequence[Objective]) -> float:
    """The mean of the objectives, each signed so that larger is better."""
    return sum(values[o.name] if o.maximize else -values[o.name] for o in objectives) / len(
        objectives
    )


def single_objective(spec: StudySpec) -> bool:
    return spec.search.scalarised


def told_values(
    spec: StudySpec, objectives: Sequence[Objective], values: Mapping[str, float]
) -> list[float]:
    """What Optuna is told for these objective values: the macro-average for a
    single-valued study, else one value per objective."""
    if single_objective(spec):
        return [macro_average(dict(values), objectives)]
    return [values[o.name] for o in objectives]


def told_maximize(spec: StudySpec, objectives: Sequence[Objective]) -> list[bool]:
    """The direction of each value Optuna is told (`told_values`)."""
    if single_objective(spec):
        return [True]
    return [o.maximize for o in objectives]


def objective_values(
    objectives: Sequence[Objective], metrics: Mapping[str, Mapping[str, float]]
) -> dict[str, float] | str:
    """Each objective's value in lm-eval's `metrics`, or why one cannot be read."""
    values: dict[str, float] = {}
    for o in objectives:
        task_metrics = metrics.get(o.task)
        if task_metrics is None:
            got = ", ".join(sorted(metrics)) or "none"
            return f"lm-eval returned no results for task {o.task} (got: {got})"
        value = lookup_metric(dict(task_metrics), o.metric)
        if value is None:
            got = ", ".join(sorted(task_metrics))
            return f"task {o.task} has no metric {o.metric} (got: {got})"
        if not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
            return f"objective {o.name} is not a finite number: {value!r}"
        values[o.name] = float(value)
    return values


def owner_id() -> str:
    """host:pid:process start time — unique for a process even after pid reuse."""
    created = psutil.Process(os.getpid()).create_time()
    return f"{socket.gethostname()}:{os.getpid()}:{created:.2f}"


def _owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None for another host (unknowable here)."""
    try:
        host, pid_text, created_text = owner.rsplit(":", 2)
        pid, created = int(pid_text), float(created_text)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(pid).create_time() - created) < 0.05
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


@dataclass
class StudyHandle:
    """A study and the storage object it was opened on (for trial-level storage calls)."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    created: bool


def open_study(
    spec: StudySpec,
    space_fingerprint: dict[str, Any],
    objectives: Sequence[Objective],
    *,
    create: bool = True,
    doc_split: dict[str, dict[str, Any]] | None = None,
) -> StudyHandle:
    """Load the study (or create it when `create`), check it matches, attach a seeded sampler.

    `doc_split`: each task's dev/test documents (stored on creation, compared on resume).
    """
    storage = open_storage(spec.storage_url) if create else open_existing(spec)
    n_values = 1 if single_objective(spec) else len(objectives)
    exists = spec.name in study_names(storage, spec)
    n_existing, in_use = 0, False
    if exists:
        probe = optuna.load_study(study_name=spec.name, storage=storage)
        trials = probe.get_trials(deepcopy=False)
        n_existing = len(trials)
        in_use = not baselines_enqueued(probe.user_attrs) or any(
            t.state == TrialState.RUNNING for t in trials
        )
    sampler = _sampler(spec, n_values, n_existing, in_use=in_use)
    if exists:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler)
        _await_creator(study, baselines_enqueued if create else identity_written)
        _check_matches(spec, study, space_fingerprint, objectives)
        if doc_split is not None:
            check_doc_split(spec, stored_doc_split(study.user_attrs), doc_split)
        return StudyHandle(study, storage, created=False)
    directions: list[Literal["minimize", "maximize"]] = (
        ["maximize"]
        if single_objective(spec)
        else ["maximize" if o.maximize else "minimize" for o in objectives]
    )
    try:
        study = optuna.create_study(
            study_name=spec.name, storage=storage, sampler=sampler, directions=directions
        )
    except optuna.exceptions.DuplicatedStudyError:  # another process created it a moment ago
        sampler = _sampler(spec, n_values, 0, in_use=True)
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler)
        _await_creator(study, baselines_enqueued if create else identity_written)
        _check_matches(spec, study, space_fingerprint, objectives)
        return StudyHandle(study, storage, created=False)
    with warnings.catch_warnings():
        # Experimental since Optuna 3.2 and still the only way to name the objectives.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([MACRO] if single_objective(spec) else [o.name for o in objectives])
    write_identity(study, objectives, space_fingerprint)
    if doc_split is not None:
        write_doc_split(study, doc_split)
    return StudyHandle(study, storage, created=True)


def _sampler(
    spec: StudySpec, n_values: int, n_existing: int, *, in_use: bool
) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded from the study file. A study another process is driving
    now also mixes in this process's id: two drivers with one seed would propose the same
    weights in the same order."""
    seed = effective_seed(spec.search.seed, n_existing)
    if in_use:
        seed = (seed ^ zlib.crc32(owner_id().encode())) % (2**32)
    return make_sampler(
        spec.search.sampler, seed, n_objectives=n_values, n_trials=spec.search.n_trials
    )


# How long a start waits for a process that created the study a moment ago to record
# its objectives and space (a few writes; longer means that process died doing it).
CREATOR_WAIT = 30.0


def _await_creator(study: optuna.Study, written: Callable[[Mapping[str, Any]], bool]) -> None:
    """Wait, bounded, until the study's creator has stored what `written` looks for: its
    identity (what _check_matches reads), or that the baselines are queued (a second
    driver starting with the first must not queue them again)."""
    deadline = time.monotonic() + CREATOR_WAIT
    while not written(study.user_attrs) and time.monotonic() < deadline:
        time.sleep(0.2)


# What a changed field of a task's split record means to the user, and the key to look at.
_SPLIT_FIELDS = {
    "seed": ("eval.split_seed", "split seed"),
    "fraction": ("eval.dev_fraction", "dev fraction"),
    "source": ("objectives", "scored split"),
    "docs": ("eval.datasets", "number of documents"),
    "docs_sha256": ("eval.datasets", "documents (the dataset changed)"),
    "dev_ids_sha256": ("eval.split_seed", "dev document ids"),
    "splits": ("eval.split", "named splits"),
}


def check_doc_split(
    spec: StudySpec,
    stored: Mapping[str, Mapping[str, Any]] | None,
    now: Mapping[str, Mapping[str, Any]],
) -> None:
    """Refuse a resume that would score other documents than the study did, naming what
    changed."""
    if stored is None:
        return  # a study made before splits were recorded: nothing to compare
    for task in sorted(set(stored) | set(now)):
        old, new = stored.get(task), now.get(task)
        if old is None or new is None:
            raise RecyclerError(
                f"objectives: study {spec.name!r} "
                f"{'did not score' if old is None else 'scored'} task {task}; use a new study name"
            )
        for key, (where, what) in _SPLIT_FIELDS.items():
            if old.get(key) != new.get(key):
                raise RecyclerError(
                    f"{where}: study {spec.name!r} split task {task} with {what} "
                    f"{old.get(key)!r}, this study file gives {new.get(key)!r}; use a new study "
                    "name or the study's setting"
                )


def _check_matches(
    spec: StudySpec,
    study: optuna.Study,
    space_fingerprint: dict[str, Any],
    objectives: Sequence[Objective],
) -> None:
    stored = stored_objectives(study.user_attrs)
    if stored is None:
        raise RecyclerError(
            f"name: study {spec.name!r} in {shown(spec.storage)} was not made by recycler; "
            "choose another name"
        )
    if stored != list(objectives):
        created = ", ".join(
            o.name + "/" + ("maximize" if o.maximize else "minimize") for o in stored
        )
        raise RecyclerError(
            f"storage: study {spec.name!r} in {shown(spec.storage)} was created with other "
            f"objectives ({created}); use a new study name"
        )
    space = stored_space(study.user_attrs)
    for key, value in space_fingerprint.items():
        if space.get(key) != value:
            raise RecyclerError(
                f"study {spec.name!r} was created with a different {key} "
                f"({space.get(key)!r}, now {value!r}); use a new study name"
            )
    n_values = 1 if single_objective(spec) else len(objectives)
    if len(study.directions) != n_values:
        raise RecyclerError(
            f"search.objective: study {spec.name!r} holds {len(study.directions)} objective "
            "value(s), "
            f"this study file asks for {n_values}; use a new study name"
        )


# ---- trials left RUNNING by a process that died ------------------------------------------


def _stale_reason(trial: FrozenTrial, now: float) -> str | None:
    """Why a RUNNING trial is presumed abandoned, or None while it may still be running."""
    record = read_trial(trial)
    owner = record.owner
    started = trial.datetime_start.timestamp() if trial.datetime_start is not None else now
    if owner is not None:
        alive = _owner_alive(owner)
        if alive is not None:  # an owner on this host: its process is alive or it is not
            return (
                None
                if alive
                else f"stale: the process that ran it ({owner.rsplit(':', 1)[0]}) is gone"
            )
        last = record.heartbeat if record.heartbeat is not None else started
        if now - last > STALE_AFTER:
            return f"stale: no heartbeat from {owner.rsplit(':', 2)[0]} for {now - last:.0f} s"
        return None
    # No owner yet: the process died between asking for the trial and stamping it.
    if now - started > OWNERLESS_AFTER:
        return f"stale: never claimed by a process ({now - started:.0f} s)"
    return None


@contextmanager
def heartbeat(running: Callable[[], Sequence[optuna.Trial]]) -> Iterator[None]:
    """Stamp the trials `running()` names every HEARTBEAT_INTERVAL s while the block runs:
    a start on another host reads the stamps (`_stale_reason`)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_INTERVAL):
            for trial in running():
                with contextlib.suppress(Exception):  # finished meanwhile: nothing to stamp
                    TrialWriter.of(trial).heartbeat()

    thread = threading.Thread(target=beat, name="recycler-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def enqueue(
    study: optuna.Study,
    params: Mapping[str, float],
    attrs: dict[str, Any],
    *,
    skip_if_exists: bool = False,
) -> None:
    """Queue a trial with fixed parameters; `attrs` from `stored.queued_attrs`."""
    study.enqueue_trial(dict(params), user_attrs=attrs, skip_if_exists=skip_if_exists)


def fail_stale_trials(handle: StudyHandle) -> list[int]:
    """Fail the RUNNING trials whose process is gone and enqueue their parameters again.

    Uses only the storage's public API (trial ids looked up by study name and trial
    number). Returns the numbers of the trials failed.
    """
    study, storage = handle.study, handle.storage
    study_id = storage.get_study_id_from_name(study.study_name)
    now = time.time()
    failed: list[int] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _stale_reason(trial, now)
        if reason is None:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            TrialWriter.in_storage(storage, trial_id).failure(reason, stale=True)
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process finished or failed it first
        failed.append(trial.number)
        # An enqueued trial is re-run with all its parameters; a sampled one killed mid-way
        # with those it had (the sampler proposes the rest).
        params = dict(read_trial(trial).enqueued_params or trial.params)
        if params:
            enqueue(study, params, rerun_attrs(trial.number, trial.user_attrs, params))
    return failed


def requeue_failed_baselines(study: optuna.Study) -> list[int]:
    """Enqueue again every baseline and greedy step all of whose copies failed; the
    numbers of the failed trials re-run. Called when a search starts, so that a study fixed after
    its baselines failed compares its search with every baseline."""
    copies: dict[tuple[str, tuple[str, ...]], list[FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        identity = _baseline_identity(trial)
        if identity is not None:
            copies.setdefault(identity, []).append(trial)
    requeued: list[int] = []
    for trials in copies.values():
        # A stale copy's re-run is one of the copies: all failed means it failed too.
        if any(t.state != TrialState.FAIL for t in trials):
            continue
        last = trials[-1]
        params = dict(read_trial(last).enqueued_params or last.params)
        if params:
            enqueue(study, params, rerun_attrs(last.number, last.user_attrs, params))
            requeued.append(last.number)
    return requeued


def _baseline_identity(trial: FrozenTrial) -> tuple[str, tuple[str, ...]] | None:
    """A baseline's label and a greedy step's members; None for a trial of the search."""
    record = read_trial(trial)
    if not isinstance(record.baseline, str):
        return None
    return record.baseline, tuple(record.user_members or ())


def duplicate_of(study: optuna.Study, number: int) -> int | None:
    """The earlier trial that already runs (or ran, or will run) the same baseline or greedy
    step as trial `number`, if any.

    Two processes may enqueue one baseline at the same moment; trial numbers follow the
    order the trials were created in, so the earliest live copy is the one that runs, and
    each later copy, whichever process takes it, sees that earlier one. A failed copy is
    not live: its re-run (`requeue_failed_baselines`) runs.
    """
    trials = study.get_trials(deepcopy=False)
    mine = next((_baseline_identity(t) for t in trials if t.number == number), None)
    if mine is None:
        return None
    for t in trials:
        if t.number < number and _baseline_identity(t) == mine and t.state != TrialState.FAIL:
            return t.number
    return None


# ---- reading a study back as records ------------------------------------------------------


def load_view(spec: StudySpec) -> StudyView:
    """The stored study as records, for `front`, `export`, `report` (never creates anything)."""
    storage = open_existing(spec)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:  # deleted since open_existing looked
        raise no_such_study(spec) from None
    except Exception as exc:
        raise RecyclerError(
            f"storage: cannot open {shown(spec.storage)}: "
            f"{masked(str(exc).splitlines()[0], spec.storage_url)}"
        ) from None
    view = view_of(study)
    if not view.objectives:
        raise RecyclerError(
            f"name: study {spec.name!r} in {shown(spec.storage)} was not made by recycler"
        )
    return view
