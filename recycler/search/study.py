"""The Optuna study behind a study file: create or resume it, and read it back as plain records.

What lives in the storage (so the dashboard, `front`, `export` and a resumed search all
read one source of truth):

- the study: objective names (`set_metric_names`), directions, and user attributes
  `recycler:objectives` / `recycler:space` (a resume with a different space or objective
  list is refused rather than mixed in), `recycler:seeded` (baselines were enqueued),
  and `test:<trial number>` (the Pareto set's test-split scores: Optuna forbids changing
  a finished trial, so they are kept on the study, keyed by trial);
- each trial: `weights` (by checkpoint name), `recipe` (the mergekit dict that was
  merged), `objectives` and `dev` (every metric of every task), `merge_seconds`,
  `eval_seconds`, `baseline` for seeded trials, `cache_hit` when the result was reused,
  `fail_reason` for failures, `owner` and `heartbeat` (who runs it; used to fail
  trials left RUNNING by a killed process).
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.search.samplers import effective_seed, make_sampler

ATTR_OBJECTIVES = "recycler:objectives"
ATTR_SPACE = "recycler:space"
ATTR_SEEDED = "recycler:seeded"
ATTR_GREEDY = "recycler:greedy_soup"
TEST_PREFIX = "test:"
MACRO = "macro"
# A trial of another host is presumed dead once its heartbeat is this old (seconds).
HEARTBEAT_INTERVAL = 30.0
STALE_AFTER = 300.0
# A trial nobody stamped as its owner within this many seconds of its start was orphaned.
OWNERLESS_AFTER = 60.0


@dataclass(frozen=True)
class Objective:
    name: str
    task: str
    metric: str
    maximize: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "metric": self.metric,
            "direction": "maximize" if self.maximize else "minimize",
        }


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
    import psutil

    created = psutil.Process(os.getpid()).create_time()
    return f"{socket.gethostname()}:{os.getpid()}:{created:.2f}"


def _owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None for another host (unknowable here)."""
    import psutil

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
) -> StudyHandle:
    """Load the study (or create it when `create`), check it matches, attach a seeded sampler."""
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
    study.set_user_attr(ATTR_OBJECTIVES, [o.as_dict() for o in objectives])
    study.set_user_attr(ATTR_SPACE, space_fingerprint)
    return StudyHandle(study, storage, created=True)


def _check_matches(
    spec: StudySpec,
    study: optuna.Study,
    space_fingerprint: dict[str, Any],
    objectives: Sequence[Objective],
) -> None:
    stored_obj = study.user_attrs.get(ATTR_OBJECTIVES)
    if stored_obj is None:
        raise RecyclerError(
            f"name: study {spec.name!r} in {spec.storage} was not made by recycler; choose another name"
        )
    if stored_obj != [o.as_dict() for o in objectives]:
        raise RecyclerError(
            f"objectives: differ from those study {spec.name!r} was created with "
            f"({', '.join(o['name'] + '/' + o['direction'] for o in stored_obj)}); use a new study name"
        )
    stored_space = study.user_attrs.get(ATTR_SPACE, {})
    for key, value in space_fingerprint.items():
        if stored_space.get(key) != value:
            raise RecyclerError(
                f"study {spec.name!r} was created with a different {key} "
                f"({stored_space.get(key)!r}, now {value!r}); use a new study name"
            )
    n_values = 1 if single_objective(spec) else len(objectives)
    if len(study.directions) != n_values:
        raise RecyclerError(
            f"search.objective: study {spec.name!r} holds {len(study.directions)} objective value(s), "
            f"this study file asks for {n_values}; use a new study name"
        )


# ---- trials left RUNNING by a process that died ------------------------------------------


def _stale_reason(trial: FrozenTrial, now: float) -> str | None:
    """Why a RUNNING trial is presumed abandoned, or None while it may still be running."""
    owner = trial.user_attrs.get("owner")
    started = trial.datetime_start.timestamp() if trial.datetime_start is not None else now
    if isinstance(owner, str):
        alive = _owner_alive(owner)
        if alive is not None:  # an owner on this host: its process is alive or it is not
            return (
                None
                if alive
                else f"stale: the process that ran it ({owner.rsplit(':', 1)[0]}) is gone"
            )
        beat = trial.user_attrs.get("heartbeat")
        last = float(beat) if isinstance(beat, int | float) else started
        if now - last > STALE_AFTER:
            return f"stale: no heartbeat from {owner.rsplit(':', 2)[0]} for {now - last:.0f} s"
        return None
    # No owner yet: the process died between asking for the trial and stamping it.
    if now - started > OWNERLESS_AFTER:
        return f"stale: never claimed by a process ({now - started:.0f} s)"
    return None


ATTR_ENQUEUED = "enqueued_params"


def enqueue(
    study: optuna.Study,
    params: dict[str, float],
    attrs: dict[str, Any],
    *,
    skip_if_exists: bool = False,
) -> None:
    """Queue a trial with fixed parameters, also kept as a user attribute.

    Optuna stores a trial's parameters one call at a time as they are suggested, so a
    process killed in between leaves only some on the trial; its re-run needs them all.
    """
    study.enqueue_trial(
        params, user_attrs={**attrs, ATTR_ENQUEUED: dict(params)}, skip_if_exists=skip_if_exists
    )


def rerun_attrs(trial: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    """The user attributes a re-run of `trial` keeps: what it is (a baseline, a greedy
    step) and which trial it repeats."""
    attrs = {k: v for k, v in trial.user_attrs.items() if k in ("baseline", "greedy_members")}
    attrs["rerun_of"] = trial.number
    return attrs


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
            storage.set_trial_user_attr(trial_id, "fail_reason", reason)
            storage.set_trial_user_attr(trial_id, "stale", True)
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process finished or failed it first
        failed.append(trial.number)
        # An enqueued trial is re-run with all its parameters; a sampled one killed mid-way
        # with those it had (the sampler proposes the rest).
        params = dict(trial.user_attrs.get(ATTR_ENQUEUED) or trial.params)
        if params:
            enqueue(study, params, rerun_attrs(trial))
    return failed


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Finished trials count toward n_trials, except stale ones that were run again."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get("stale", False)


# ---- reading a study back as plain records -----------------------------------------------


@dataclass
class TrialRecord:
    number: int
    state: str
    objectives: dict[str, float]
    metrics: dict[str, dict[str, float]]
    weights: dict[str, Any]
    recipe: dict[str, Any] | None
    baseline: str | None
    merge_seconds: float | None
    eval_seconds: float | None
    fail_reason: str | None
    test_objectives: dict[str, float] | None = None
    test_metrics: dict[str, dict[str, float]] | None = None
    test_error: str | None = None
    cache_hit: int | None = None
    completed_at: float | None = None
    user_members: list[str] | None = None  # a greedy-soup step's checkpoints
    vector_dev: list[float] | None = None  # the objectives on dev, in the study's order

    def vector(self, objectives: Sequence[Objective], split: str = "dev") -> list[float] | None:
        src = self.objectives if split == "dev" else self.test_objectives
        if src is None or any(o.name not in src for o in objectives):
            return None
        return [float(src[o.name]) for o in objectives]


@dataclass
class StudyView:
    name: str
    objectives: list[Objective]
    trials: list[TrialRecord]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "COMPLETE" and t.vector_dev is not None]

    @property
    def maximize(self) -> list[bool]:
        return [o.maximize for o in self.objectives]

    @property
    def greedy_soup(self) -> int | None:
        value = self.attrs.get(ATTR_GREEDY)
        return int(value) if isinstance(value, int) else None


def view_of(study: optuna.Study) -> StudyView:
    attrs = dict(study.user_attrs)
    stored = attrs.get(ATTR_OBJECTIVES) or []
    objectives = [
        Objective(o["name"], o["task"], o["metric"], o["direction"] == "maximize") for o in stored
    ]
    records = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        test = attrs.get(f"{TEST_PREFIX}{t.number}") or {}
        records.append(
            TrialRecord(
                number=t.number,
                state=t.state.name,
                objectives={k: float(v) for k, v in (ua.get("objectives") or {}).items()},
                metrics=ua.get("dev") or {},
                weights=ua.get("weights") or {},
                recipe=ua.get("recipe"),
                baseline=ua.get("baseline"),
                merge_seconds=ua.get("merge_seconds"),
                eval_seconds=ua.get("eval_seconds"),
                fail_reason=ua.get("fail_reason"),
                test_objectives=test.get("objectives"),
                test_metrics=test.get("metrics"),
                test_error=test.get("error"),
                cache_hit=ua.get("cache_hit"),
                completed_at=t.datetime_complete.timestamp() if t.datetime_complete else None,
                user_members=ua.get("greedy_members"),
            )
        )
    for r in records:
        r.vector_dev = r.vector(objectives, "dev")
    return StudyView(study.study_name, objectives, records, attrs)


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


def finite_scores(values: dict[str, float]) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values.values())
