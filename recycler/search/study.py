"""The Optuna study behind a study file: create or resume it, fail what a dead process left
running, and load it back as records. What it stores, and under which keys, is `stored`'s.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
import psutil
from optuna.trial import FrozenTrial, TrialState

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.search.samplers import effective_seed, make_sampler
from recycler.search.stored import (
    Objective,
    StudyView,
    TrialWriter,
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
    url = spec.storage_url
    sqlite = spec.sqlite_path
    if not create and sqlite is not None and not sqlite.exists():
        raise RecyclerError(
            f"{spec.storage}: no study yet (no file {sqlite}); run recycler search first"
        )
    try:
        storage = optuna.storages.get_storage(url)
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # SQLAlchemy's many errors: a bad URL, no driver, no server
        raise RecyclerError(
            f"storage: cannot open {spec.storage}: {str(exc).splitlines()[0]}"
        ) from None
    n_values = 1 if single_objective(spec) else len(objectives)
    exists = spec.name in names
    if not exists and not create:
        raise RecyclerError(
            f"name: no study {spec.name!r} in {spec.storage}; run recycler search first"
        )
    n_existing = 0
    if exists:
        probe = optuna.load_study(study_name=spec.name, storage=storage)
        n_existing = len(probe.get_trials(deepcopy=False))
    sampler = make_sampler(
        spec.search.sampler,
        effective_seed(spec.search.seed, n_existing),
        n_objectives=n_values,
        n_trials=spec.search.n_trials,
    )
    if exists:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler)
        _check_matches(spec, study, space_fingerprint, objectives)
        if doc_split is not None:
            check_doc_split(spec, stored_doc_split(study.user_attrs), doc_split)
        return StudyHandle(study, storage, created=False)
    directions: list[Literal["minimize", "maximize"]] = (
        ["maximize"]
        if single_objective(spec)
        else ["maximize" if o.maximize else "minimize" for o in objectives]
    )
    study = optuna.create_study(
        study_name=spec.name, storage=storage, sampler=sampler, directions=directions
    )
    with warnings.catch_warnings():
        # Experimental since Optuna 3.2 and still the only way to name the objectives.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([MACRO] if single_objective(spec) else [o.name for o in objectives])
    write_identity(study, objectives, space_fingerprint)
    if doc_split is not None:
        write_doc_split(study, doc_split)
    return StudyHandle(study, storage, created=True)


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
            f"name: study {spec.name!r} in {spec.storage} was not made by recycler; choose another "
            "name"
        )
    if stored != list(objectives):
        created = ", ".join(
            o.name + "/" + ("maximize" if o.maximize else "minimize") for o in stored
        )
        raise RecyclerError(
            f"objectives: differ from those study {spec.name!r} was created with ({created}); use "
            "a new study name"
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


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Finished trials count toward n_trials, except stale ones that were run again."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not read_trial(trial).stale


# ---- reading a study back as records ------------------------------------------------------


def load_view(spec: StudySpec) -> StudyView:
    """The stored study as records, for `front`, `export`, `report` (never creates anything)."""
    sqlite = spec.sqlite_path
    if sqlite is not None and not sqlite.exists():
        raise RecyclerError(
            f"storage: no study yet ({sqlite} does not exist); run recycler search first"
        )
    try:
        study = optuna.load_study(study_name=spec.name, storage=spec.storage_url)
    except KeyError:
        raise RecyclerError(
            f"name: no study {spec.name!r} in {spec.storage}; run recycler search first"
        ) from None
    except Exception as exc:
        raise RecyclerError(
            f"storage: cannot open {spec.storage}: {str(exc).splitlines()[0]}"
        ) from None
    view = view_of(study)
    if not view.objectives:
        raise RecyclerError(f"name: study {spec.name!r} in {spec.storage} was not made by recycler")
    return view
