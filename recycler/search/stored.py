"""What a study stores in Optuna: every key, its one writer and its one reader.

The dashboard, `front`, `export`, `report` and a resumed search all read the same
storage, so each name below is written here and read back here, nowhere else.

- the study: objective names (`set_metric_names`), directions, and user attributes
  `StudyKey.OBJECTIVES` / `StudyKey.SPACE` (a resume with a different space or
  objective list is refused rather than mixed in), `StudyKey.DOC_SPLIT` (each task's
  dev/test documents; a resume that would score others is refused, and `front` and the
  report say which documents a score used), `StudyKey.DEV_DOCS` (a full trial's
  documents: the unit of cost), `StudyKey.BASELINES_ENQUEUED`,
  `StudyKey.GREEDY_SOUP` (the greedy soup's trial, once settled), `StudyKey.STRATA` (a
  stratified study's strata), and
  `StudyKey.TEST_PREFIX` + trial number (the Pareto set's test-split scores: Optuna
  forbids changing a finished trial, so they are kept on the study, keyed by trial);
- each trial: the `TrialKey` attributes (weights by checkpoint, each tuned value, the
  recipe merged, objectives and every metric on dev, timings, the documents it scored,
  the baseline it is, the cached result it reused, why it failed, which process runs it, with
  `search.fidelity` its scores per rung and the rung it was promoted to, and with
  `eval.documents: stratified` its documents' scores and its estimate's standard errors).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial


class StudyKey:
    """User attributes of the study."""

    OBJECTIVES = "recycler:objectives"
    SPACE = "recycler:space"
    # Per leaf task, which documents dev and test are (`TaskSuite.split_records`).
    DOC_SPLIT = "recycler:doc_split"
    BASELINES_ENQUEUED = "recycler:seeded"
    # The dev documents of a full-fidelity trial, summed over tasks: the unit of cost.
    DEV_DOCS = "recycler:dev_docs"
    GREEDY_SOUP = "recycler:greedy_soup"
    # eval.documents: stratified: the strata of each task's dev documents
    # (`evaluate.strata.Strata.record`), built once from the checkpoint baselines.
    STRATA = "recycler:strata"
    TEST_PREFIX = "test:"


class TrialKey:
    """User attributes of a trial."""

    OWNER = "owner"  # host:pid:start time of the process that runs it
    HEARTBEAT = "heartbeat"  # when that process last said it still runs it
    WEIGHTS = "weights"  # by checkpoint name (a dict per group for grouped weights)
    # One attribute per tuned method parameter, "tuned:<name>" (the dashboard shows each
    # as a column): its value, or {group: value} where it is set per group of tensors.
    TUNED_PREFIX = "tuned:"
    RECIPE = "recipe"  # the mergekit dict that was merged
    DEV = "dev"  # every metric of every task on the search's split
    OBJECTIVES = "objectives"  # objective name -> value on that split
    MERGE_SECONDS = "merge_seconds"
    EVAL_SECONDS = "eval_seconds"
    CACHE_HIT = "cache_hit"  # the trial whose result this one reused
    FAIL_REASON = "fail_reason"
    STALE = "stale"  # failed because its process died; re-run, not counted
    BASELINE = "baseline"  # the baseline an enqueued trial is
    GREEDY_MEMBERS = "greedy_members"  # a greedy-soup step's checkpoints
    RERUN_OF = "rerun_of"  # the stale trial this one repeats
    # The earlier trial that runs the same baseline or greedy step (two drivers queued it
    # at once); this one failed without running and counts for nothing.
    DUPLICATE_OF = "duplicate_of"
    # Optuna stores a trial's parameters one call at a time as they are suggested, so a
    # process killed in between leaves only some on the trial; its re-run needs them all.
    ENQUEUED_PARAMS = "enqueued_params"
    # Documents this trial's own evaluations scored (a cache hit: 0), and those of the
    # evaluation it runs now: the cost a `search.budget` counts.
    DOCS_SCORED = "docs_scored"
    DOCS_IN_FLIGHT = "docs_in_flight"
    # Multi-fidelity (search.fidelity): rung index → the objectives on that rung's
    # documents (what ranks the trial there; the dashboard shows them on a PRUNED trial),
    # each scored document's values while the trial runs (`results.DocScores`: what later
    # rungs add to, and what a re-run goes on from; dropped once it finishes), and the
    # rung the trial was promoted to (a decision a resume keeps).
    RUNGS = "rungs"
    DOC_SCORES = "doc_scores"
    PROMOTED_TO = "promoted_to"
    # eval.documents: stratified: each document's scores of a finished trial (every dev
    # document for a checkpoint baseline: the strata are built from them), and, for a
    # trial told an estimate, each objective's standard error.
    SCORED_DOCS = "scored_docs"
    DEV_STDERR = "dev_stderr"


# Keys of a test-split entry (`StudyKey.TEST_PREFIX` + number).
_TEST_OBJECTIVES, _TEST_METRICS, _TEST_ERROR = "objectives", "metrics", "error"
_MAX_REASON = 2000


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Objective:
        return cls(data["name"], data["task"], data["metric"], data["direction"] == "maximize")


def json_safe(value: Any) -> Any:
    """User attributes are JSON: NaN/inf become None, tuples lists."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


# ---- the writers ----------------------------------------------------------------------


class TrialWriter:
    """Writes a trial's user attributes through `set_attr(key, value)`: a running trial's
    `set_user_attr`, or the storage's, for a trial another process left behind."""

    def __init__(self, set_attr: Callable[[str, Any], None]) -> None:
        self._set = set_attr

    @classmethod
    def of(cls, trial: optuna.Trial) -> TrialWriter:
        return cls(trial.set_user_attr)

    @classmethod
    def in_storage(cls, storage: optuna.storages.BaseStorage, trial_id: int) -> TrialWriter:
        return cls(lambda key, value: storage.set_trial_user_attr(trial_id, key, value))

    def claim(self, owner: str) -> None:
        self._set(TrialKey.OWNER, owner)
        self.heartbeat()

    def heartbeat(self) -> None:
        self._set(TrialKey.HEARTBEAT, time.time())

    def proposal(self, weights: Mapping[str, Any], tuned: Mapping[str, Any]) -> None:
        """What the trial merges: its weights by checkpoint and its tuned values, exactly."""
        self._set(TrialKey.WEIGHTS, json_safe(dict(weights)))
        for name, value in tuned.items():
            self._set(f"{TrialKey.TUNED_PREFIX}{name}", json_safe(value))

    def recipe(self, recipe: Mapping[str, Any]) -> None:
        self._set(TrialKey.RECIPE, dict(recipe))

    def cache_hit(self, trial_number: int) -> None:
        self._set(TrialKey.CACHE_HIT, trial_number)

    def scores(self, metrics: Mapping[str, Any], objectives: Mapping[str, float]) -> None:
        self._set(TrialKey.DEV, json_safe(dict(metrics)))
        self._set(TrialKey.OBJECTIVES, dict(objectives))

    def timings(self, merge_seconds: float, eval_seconds: float) -> None:
        self._set(TrialKey.MERGE_SECONDS, round(merge_seconds, 3))
        self._set(TrialKey.EVAL_SECONDS, round(eval_seconds, 3))

    def cost(self, docs_scored: int, docs_in_flight: int = 0) -> None:
        self._set(TrialKey.DOCS_SCORED, docs_scored)
        self._set(TrialKey.DOCS_IN_FLIGHT, docs_in_flight)

    def rungs(
        self, doc_scores: Mapping[str, Any], rungs: Mapping[int, Mapping[str, float]]
    ) -> None:
        """The documents scored so far and the objectives on every rung they cover."""
        self._set(TrialKey.DOC_SCORES, dict(doc_scores))
        self._set(TrialKey.RUNGS, {str(k): dict(v) for k, v in sorted(rungs.items())})

    def drop_doc_scores(self) -> None:
        """A finished trial's document scores are needed no more (its `rungs` stay)."""
        self._set(TrialKey.DOC_SCORES, None)

    def scored_docs(self, scores: Mapping[str, Any]) -> None:
        self._set(TrialKey.SCORED_DOCS, dict(scores))

    def dev_stderr(self, stderr: Mapping[str, float]) -> None:
        self._set(TrialKey.DEV_STDERR, json_safe(dict(stderr)))

    def promoted(self, rung: int) -> None:
        self._set(TrialKey.PROMOTED_TO, rung)

    def duplicate(self, trial_number: int) -> None:
        self._set(TrialKey.DUPLICATE_OF, trial_number)

    def failure(self, reason: str, *, stale: bool = False) -> None:
        self._set(TrialKey.FAIL_REASON, reason[:_MAX_REASON])
        if stale:
            self._set(TrialKey.STALE, True)


def queued_attrs(
    params: Mapping[str, float],
    *,
    baseline: str | None = None,
    greedy_members: Sequence[str] | None = None,
    rerun_of: int | None = None,
    carried: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The user attributes of an enqueued trial: what it is, and all its parameters;
    `carried`: a re-run's finished rung evaluations (`rerun_attrs`)."""
    attrs: dict[str, Any] = {TrialKey.ENQUEUED_PARAMS: dict(params), **(carried or {})}
    if baseline is not None:
        attrs[TrialKey.BASELINE] = baseline
    if greedy_members is not None:
        attrs[TrialKey.GREEDY_MEMBERS] = list(greedy_members)
    if rerun_of is not None:
        attrs[TrialKey.RERUN_OF] = rerun_of
    return attrs


def rerun_attrs(
    number: int, user_attrs: Mapping[str, Any], params: Mapping[str, float]
) -> dict[str, Any]:
    """The user attributes of a re-run of trial `number`: what it was (a baseline, a
    greedy step), which trial it repeats, all its parameters, and the rung evaluations it
    finished (a re-run goes on from them: a killed search loses no finished rung)."""
    return queued_attrs(
        params,
        baseline=user_attrs.get(TrialKey.BASELINE),
        greedy_members=user_attrs.get(TrialKey.GREEDY_MEMBERS),
        rerun_of=number,
        carried={
            k: user_attrs[k]
            for k in (TrialKey.RUNGS, TrialKey.DOC_SCORES, TrialKey.PROMOTED_TO)
            if k in user_attrs
        },
    )


def write_identity(
    study: optuna.Study, objectives: Sequence[Objective], space: Mapping[str, Any]
) -> None:
    """What a resumed study must match: its objectives and its search space."""
    study.set_user_attr(StudyKey.OBJECTIVES, [o.as_dict() for o in objectives])
    study.set_user_attr(StudyKey.SPACE, dict(space))


def write_doc_split(study: optuna.Study, doc_split: Mapping[str, Mapping[str, Any]]) -> None:
    """Each task's dev/test documents (`TaskSuite.split_records`), kept from creation on."""
    study.set_user_attr(StudyKey.DOC_SPLIT, json_safe(dict(doc_split)))


def write_dev_docs(study: optuna.Study, n_docs: int) -> None:
    study.set_user_attr(StudyKey.DEV_DOCS, n_docs)


def write_strata(study: optuna.Study, strata: Mapping[str, Any]) -> None:
    study.set_user_attr(StudyKey.STRATA, dict(strata))


def mark_baselines_enqueued(study: optuna.Study) -> None:
    study.set_user_attr(StudyKey.BASELINES_ENQUEUED, True)


def settle_greedy_soup(study: optuna.Study, trial_number: int | None) -> None:
    """The greedy soup's trial; None when it cannot be built (outside the search space)."""
    study.set_user_attr(StudyKey.GREEDY_SOUP, trial_number)


def write_test_result(
    study: optuna.Study,
    number: int,
    *,
    objectives: Mapping[str, float] | None = None,
    metrics: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Trial `number`'s scores on the test split (or why it has none)."""
    entry: dict[str, Any] = (
        {_TEST_ERROR: error[:_MAX_REASON]}
        if error is not None
        else {
            _TEST_OBJECTIVES: dict(objectives or {}),
            _TEST_METRICS: json_safe(dict(metrics or {})),
        }
    )
    study.set_user_attr(f"{StudyKey.TEST_PREFIX}{number}", entry)


# ---- the reader -----------------------------------------------------------------------


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
    owner: str | None = None
    heartbeat: float | None = None
    stale: bool = False
    enqueued_params: dict[str, float] | None = None
    duplicate_of: int | None = None
    docs_scored: int | None = None  # None: a trial stored before documents were counted
    docs_in_flight: int = 0
    rungs: dict[int, dict[str, float]] = field(default_factory=dict)
    doc_scores: dict[str, Any] | None = None
    promoted_to: int | None = None
    tuned: dict[str, Any] = field(default_factory=dict)  # tuned parameter -> value(s)
    # eval.documents: stratified: objective -> the standard error of its estimated dev
    # score; None for a trial scored on every dev document.
    dev_stderr: dict[str, float] | None = None

    @property
    def highest_rung(self) -> int | None:
        """The highest rung whose documents it has scored; None before any."""
        return max(self.rungs) if self.rungs else None

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
        value = self.attrs.get(StudyKey.GREEDY_SOUP)
        return int(value) if isinstance(value, int) else None

    @property
    def dev_docs(self) -> int | None:
        """The documents of a full-fidelity trial; None for a study made before they were
        counted."""
        value = self.attrs.get(StudyKey.DEV_DOCS)
        return value if isinstance(value, int) and value > 0 else None

    @property
    def pruned(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "PRUNED"]

    @property
    def strata(self) -> dict[str, Any] | None:
        """A stratified study's strata (`Strata.record`); None before they are built."""
        return stored_strata(self.attrs)

    @property
    def doc_split(self) -> dict[str, dict[str, Any]] | None:
        """Each task's dev/test documents; None for a study made before they were kept."""
        return stored_doc_split(self.attrs)


def read_trial(trial: FrozenTrial, study_attrs: Mapping[str, Any] | None = None) -> TrialRecord:
    """A trial as a record; `study_attrs` adds its test-split scores."""
    ua = trial.user_attrs
    test = (study_attrs or {}).get(f"{StudyKey.TEST_PREFIX}{trial.number}") or {}
    beat = ua.get(TrialKey.HEARTBEAT)
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        objectives={k: float(v) for k, v in (ua.get(TrialKey.OBJECTIVES) or {}).items()},
        metrics=ua.get(TrialKey.DEV) or {},
        weights=ua.get(TrialKey.WEIGHTS) or {},
        recipe=ua.get(TrialKey.RECIPE),
        baseline=baseline_of(ua),
        merge_seconds=ua.get(TrialKey.MERGE_SECONDS),
        eval_seconds=ua.get(TrialKey.EVAL_SECONDS),
        fail_reason=ua.get(TrialKey.FAIL_REASON),
        test_objectives=test.get(_TEST_OBJECTIVES),
        test_metrics=test.get(_TEST_METRICS),
        test_error=test.get(_TEST_ERROR),
        cache_hit=ua.get(TrialKey.CACHE_HIT),
        completed_at=trial.datetime_complete.timestamp() if trial.datetime_complete else None,
        user_members=ua.get(TrialKey.GREEDY_MEMBERS),
        owner=ua.get(TrialKey.OWNER) if isinstance(ua.get(TrialKey.OWNER), str) else None,
        heartbeat=float(beat) if isinstance(beat, int | float) else None,
        stale=bool(ua.get(TrialKey.STALE, False)),
        enqueued_params=ua.get(TrialKey.ENQUEUED_PARAMS),
        duplicate_of=dup if isinstance(dup := ua.get(TrialKey.DUPLICATE_OF), int) else None,
        docs_scored=ua.get(TrialKey.DOCS_SCORED),
        docs_in_flight=int(ua.get(TrialKey.DOCS_IN_FLIGHT) or 0),
        rungs=stored_rungs(ua),
        doc_scores=stored_doc_scores(ua),
        promoted_to=promoted_to(ua),
        tuned=stored_tuned(ua),
        dev_stderr=stderr if isinstance(stderr := ua.get(TrialKey.DEV_STDERR), dict) else None,
    )


def stored_tuned(trial_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's tuned method parameters: name -> value, or {group: value}."""
    prefix = TrialKey.TUNED_PREFIX
    return {k[len(prefix) :]: v for k, v in trial_attrs.items() if k.startswith(prefix)}


def stored_rungs(trial_attrs: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    """A multi-fidelity trial's objectives on each rung it finished (or its re-run carries)."""
    return {int(k): dict(v) for k, v in (trial_attrs.get(TrialKey.RUNGS) or {}).items()}


def stored_doc_scores(trial_attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The documents a multi-fidelity trial (or the trial a re-run repeats) has scored."""
    scores = trial_attrs.get(TrialKey.DOC_SCORES)
    return dict(scores) if isinstance(scores, dict) else None


def stored_scored_docs(trial_attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The documents a finished trial of a stratified study scored, with their scores."""
    scores = trial_attrs.get(TrialKey.SCORED_DOCS)
    return dict(scores) if isinstance(scores, dict) else None


def stored_strata(study_attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """A stratified study's strata (`Strata.record`); None before they are built."""
    stored = study_attrs.get(StudyKey.STRATA)
    return dict(stored) if isinstance(stored, dict) else None


def promoted_to(trial_attrs: Mapping[str, Any]) -> int | None:
    """The rung a multi-fidelity trial was promoted to, if it was."""
    rung = trial_attrs.get(TrialKey.PROMOTED_TO)
    return rung if isinstance(rung, int) else None


def baseline_of(trial_attrs: Mapping[str, Any]) -> str | None:
    """The baseline an enqueued trial is (from a trial's user attributes); None for the
    search's own."""
    baseline = trial_attrs.get(TrialKey.BASELINE)
    return baseline if isinstance(baseline, str) else None


def stored_objectives(study_attrs: Mapping[str, Any]) -> list[Objective] | None:
    """The objectives a study was created with; None for a study recycler did not make."""
    stored = study_attrs.get(StudyKey.OBJECTIVES)
    return None if stored is None else [Objective.from_dict(o) for o in stored]


def stored_space(study_attrs: Mapping[str, Any]) -> dict[str, Any]:
    return dict(study_attrs.get(StudyKey.SPACE) or {})


def identity_written(study_attrs: Mapping[str, Any]) -> bool:
    """`write_identity` has finished (it writes the space last)."""
    return StudyKey.SPACE in study_attrs


def stored_doc_split(study_attrs: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Each task's dev/test documents as the study kept them; None when it kept none."""
    stored = study_attrs.get(StudyKey.DOC_SPLIT)
    return None if stored is None else dict(stored)


def baselines_enqueued(study_attrs: Mapping[str, Any]) -> bool:
    return bool(study_attrs.get(StudyKey.BASELINES_ENQUEUED))


def greedy_soup_settled(study_attrs: Mapping[str, Any]) -> bool:
    return StudyKey.GREEDY_SOUP in study_attrs


def view_of(study: optuna.Study) -> StudyView:
    attrs = dict(study.user_attrs)
    objectives = stored_objectives(attrs) or []
    records = [read_trial(t, attrs) for t in study.get_trials(deepcopy=False)]
    by_number = {r.number: r for r in records}
    for r in records:
        r.vector_dev = r.vector(objectives, "dev")
        # A cache hit told another trial's estimate: its error is that trial's.
        if r.cache_hit is not None and r.cache_hit in by_number:
            r.dev_stderr = by_number[r.cache_hit].dev_stderr
    return StudyView(study.study_name, objectives, records, attrs)
