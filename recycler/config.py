"""The study file: YAML in, a validated `StudySpec` out, or one error line naming the key.

Everything a search needs is checked here, before Ray, torch or lm-eval start: a typo in
the last key must not cost the minutes it takes to bring a cluster up. Relative paths
(the SQLite file of `storage` included) are resolved against the study file's folder, so
a study runs the same from any working directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from recycler.errors import RecyclerError
from recycler.merge import conditional
from recycler.merge.methods import METHODS
from recycler.search_spec import SearchSpec
from recycler.study_keys import KeyedError, StrictModel, matching
from recycler.yaml_file import load_yaml

_GLOB = re.compile(r"[*?\[]")
_OBJECTIVE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class PoolSpec(StrictModel):
    base: Path | None = None
    checkpoints: list[str] = Field(min_length=1)


class MergeSpec(StrictModel):
    method: str = "linear"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Each value as a recipe's top-level `parameters` takes it: a number (true/false for a
    # switch), a layer gradient or a list of `{filter, value}` entries.
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_slices(cls, data: Any) -> Any:
        if isinstance(data, dict) and "slices" in data:
            raise KeyedError(
                "merge.slices",
                "layer slices cannot be searched (the resident model keeps one shape); merge "
                "them with `recycler merge` and list the output under pool.checkpoints",
            )
        return data

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"must be one of {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _params(self) -> MergeSpec:
        # The recipe's parameters for every tensor and model; `weight` is what the search sets.
        method = METHODS[self.method]
        known = [n for n in method.param_names if n != "weight"]
        for key, v in self.params.items():
            spec = method.param(key)
            if spec is None or key == "weight":
                raise KeyedError(
                    "merge.params",
                    f"{key}: unknown parameter for {self.method} "
                    f"(known: {', '.join(known) or 'none'})",
                )
            try:
                setting = conditional.parse(v, key, spec.kind)
            except RecyclerError as exc:
                raise KeyedError("merge.params", str(exc)) from None
            for value in conditional.values_of(setting):
                if spec.kind != "bool" and not spec.bounds.contains(float(value)):
                    raise KeyedError("merge.params", f"{key}: must be in {spec.bounds}")
        return self


class ObjectiveSpec(StrictModel):
    name: str
    task: str
    metric: str
    # None: lm-eval's higher_is_better for the task's metric decides.
    direction: Literal["maximize", "minimize"] | None = None
    # None: the task's own (its YAML's num_fewshot, else zero-shot).
    num_fewshot: int | None = Field(default=None, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return matching(
            _OBJECTIVE_NAME,
            value,
            "must start with a letter or _ and hold only letters, digits, _ . -",
        )


GenKwarg = str | int | float | bool | list[str]


class EvalSpec(StrictModel):
    # lm-eval's include_path: the study's own folder(s) of task YAMLs, searched before
    # lm-eval's built-in tasks. Left out: built-in tasks only.
    tasks_dir: Path | list[Path] | None = None
    # A task name or a Hub dataset id -> a local copy of its data: a folder written by
    # datasets' save_to_disk (for a Hub id with configs, FOLDER/<config> may hold one),
    # or data files by split. For clusters that cannot reach the Hub.
    datasets: dict[str, Path | dict[str, Path | list[Path]]] = Field(default_factory=dict)
    # What the search optimises; "test" is what the Pareto set is re-scored on. A task
    # without both splits by name is split by document (dev_fraction, split_seed).
    split: str = "dev"
    dev_fraction: float = Field(default=0.5, gt=0, lt=1)
    split_seed: int = 0
    limit: int | None = Field(default=None, ge=1)
    # Which dev documents a trial scores: all, or (stratified) those the pool's checkpoints
    # disagree on and a seeded sample, agreed_sample of each stratum they agree on, told
    # as an estimate with its standard error (recycler.evaluate.strata).
    documents: Literal["all", "stratified"] = "all"
    agreed_sample: float = Field(default=0.1, gt=0, le=1)
    # The share of the checkpoints that may score a document otherwise than the rest while
    # it is still sampled (0: only documents every checkpoint agrees on).
    sampled_dissent: float = Field(default=0.15, ge=0, lt=0.5)
    batch_size: int | Literal["auto"] = 32
    apply_chat_template: bool = False
    # None: as lm-eval's command line does, true exactly when apply_chat_template is.
    fewshot_as_multiturn: bool | None = None
    gen_kwargs: dict[str, GenKwarg] | None = None

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer or auto")
        return value

    @model_validator(mode="after")
    def _multiturn(self) -> EvalSpec:
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise KeyedError("eval.fewshot_as_multiturn", "needs apply_chat_template: true")
        return self

    @property
    def task_folders(self) -> list[Path]:
        """`tasks_dir` as written (none, one or several folders), in include_path order."""
        value = self.tasks_dir
        return [] if value is None else list(value) if isinstance(value, list) else [value]


# How long connecting to (or starting) a search's Ray cluster may take by default.
CONNECT_TIMEOUT_S = 60.0


class ClusterSpec(StrictModel):
    # null: a Ray cluster of the search's own; "auto", "HOST:PORT", "ray://HOST:PORT": attach
    # (recycler.cluster.connect).
    address: str | None = None
    # How long connecting to (or starting) Ray may take before the search gives up
    # (recycler.cluster.connect).
    connect_timeout_s: float = Field(default=CONNECT_TIMEOUT_S, gt=0)
    shard_workers: int = Field(default=1, ge=1)
    eval_workers: int = Field(default=1, ge=1)
    gpus_per_worker: float = Field(default=0, ge=0)
    # none, or a Ray placement-group strategy for all the search's workers together
    # (recycler.cluster.evaluator): pack / strict_pack keep them on as few nodes as possible.
    placement: Literal["none", "pack", "strict_pack", "spread", "strict_spread"] = "none"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(("http://", "https://")):
            raise ValueError(
                f"{value} is a Ray dashboard's address (where `recycler submit` sends a "
                "study as a Ray job); give the cluster's ray://HOST:10001 or HOST:6379 here"
            )
        if value is not None and not value.strip():
            raise ValueError("empty; leave it out (null) for a local cluster of the search's own")
        return value


class StudySpec(StrictModel):
    name: str = Field(min_length=1)
    storage: str = "sqlite:///recycler.db"
    pool: PoolSpec
    merge: MergeSpec = Field(default_factory=MergeSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    eval: EvalSpec
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    # The folder of the study file: the root of every relative path. Not a YAML key.
    root: Path = Field(default=Path("."), exclude=True)
    # The study file itself, for messages about its keys found after it was read. Not a key.
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _tune_ranges(cls, data: Any) -> Any:
        """A bare name in search.tune takes the range merge.method's description gives it."""
        if not isinstance(data, dict):
            return data
        search, merge = data.get("search"), data.get("merge") or {}
        if (
            not isinstance(search, dict)
            or not isinstance(search.get("tune"), list)
            or not isinstance(merge, dict)
        ):
            return data
        method = METHODS.get(str(merge.get("method", "linear")))
        if method is None:
            return data
        ranges = method.tunable
        tune: list[Any] = []
        for item in search["tune"]:
            if isinstance(item, str):
                if item not in ranges:
                    raise KeyedError("search.tune", _not_tunable(item, method.name, ranges))
                item = {item: list(ranges[item])}
            tune.append(item)
        return {**data, "search": {**search, "tune": tune}}

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be an Optuna storage URL, e.g. sqlite:///recycler.db")
        if value.startswith("sqlite:") and value.rstrip("/") in ("sqlite:", "sqlite:///:memory:"):
            raise ValueError("an in-memory SQLite database would lose the study; name a file")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> StudySpec:
        names = [o.name for o in self.objectives]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise KeyedError("objectives", f"objective name {dup[0]!r} is used twice")
        pairs = [(o.task, o.metric) for o in self.objectives]
        if len(set(pairs)) != len(pairs):
            raise KeyedError("objectives", "the same task and metric are listed twice")
        shots: dict[str, int | None] = {}
        for i, o in enumerate(self.objectives):
            # lm-eval builds a task once per evaluation: one few-shot setting per task.
            if o.task in shots and shots[o.task] != o.num_fewshot:
                raise KeyedError(
                    f"objectives.{i}.num_fewshot",
                    f"task {o.task} is scored with num_fewshot {shots[o.task]} by another "
                    "objective: one setting per task",
                )
            shots[o.task] = o.num_fewshot
        self._check_method()
        if self.search.budget is not None and "n_trials" in self.search.model_fields_set:
            raise KeyedError("search.budget", "give search.n_trials or search.budget, not both")
        if self.search.weights == "simplex" and "bounds" in self.search.model_fields_set:
            raise KeyedError("search.bounds", "only used with weights: box")
        if self.eval.documents == "stratified":
            if self.search.fidelity is not None:
                raise KeyedError(
                    "eval.documents",
                    "stratified does not combine with search.fidelity: give one of them",
                )
            if "singles" not in self.search.baselines:
                raise KeyedError(
                    "eval.documents",
                    "stratified builds its strata from the checkpoints' own scores: "
                    "add singles to search.baselines",
                )
        else:
            for key in ("agreed_sample", "sampled_dissent"):
                if key in self.eval.model_fields_set:
                    raise KeyedError(f"eval.{key}", "only used with eval.documents: stratified")
        if self.eval.split == "test":
            # The front is re-scored on test: optimising on test would leave nothing held out.
            raise KeyedError("eval.split", "the search must not optimise the test split; use dev")
        return self

    def _check_method(self) -> None:
        """The pool, the searched parameters and the method's description must fit together."""
        method = METHODS[self.merge.method]
        name = method.name
        if method.needs_base and self.pool.base is None:
            raise KeyedError("pool.base", f"required by merge.method {name}")
        # A glob is counted once the pool is open (search.space).
        if not any(_GLOB.search(c) for c in self.pool.checkpoints):
            with_base = self.pool.base is not None and method.uses_base
            why = method.count_error(len(self.pool.checkpoints), with_base, "checkpoints")
            if why is not None:
                raise KeyedError("pool.checkpoints", why)
        tunable = method.tunable
        if not method.searchable:
            raise KeyedError(
                "merge.method",
                f"{name} has nothing to search: it reads no weights and has no parameter a "
                "search can tune (merge it once with `recycler merge`)",
            )
        for tune in self.search.tune:
            if tune.name not in tunable:
                raise KeyedError("search.tune", _not_tunable(tune.name, name, tunable))
            if tune.name in self.merge.params:
                raise KeyedError(
                    "search.tune", f"{tune.name} is fixed in merge.params and searched: choose one"
                )
            spec = method.param(tune.name)
            assert spec is not None
            if not (spec.bounds.contains(tune.low) and spec.bounds.contains(tune.high)):
                raise KeyedError(
                    "search.tune",
                    f"{tune.name}: range [{tune.low:g}, {tune.high:g}] leaves {spec.bounds}",
                )
        searched = {t.name for t in self.search.tune}
        for spec in method.params:
            if spec.required and spec.name not in self.merge.params and spec.name not in searched:
                raise KeyedError(
                    "merge.params", f"{spec.name}: required by {name}: set it here or tune it"
                )
        if not method.weighted and not searched:
            raise KeyedError(
                "search.tune",
                f"{name} reads no weights, so the search needs a parameter to tune "
                f"({', '.join(tunable) or f'{name} has none: it cannot be searched'})",
            )

    # -- resolved paths ---------------------------------------------------------------
    @property
    def storage_url(self) -> str:
        """`storage` with a relative SQLite file made absolute against the study's folder."""
        return resolve_storage_url(self.storage, self.root)

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file behind `storage`, or None for a server database."""
        url = self.storage_url
        if url.startswith("sqlite:///"):
            return Path(url.removeprefix("sqlite:///").split("?", 1)[0])
        return None

    @property
    def base_path(self) -> Path | None:
        return None if self.pool.base is None else self.resolve(self.pool.base)

    @property
    def task_dirs(self) -> list[Path]:
        """The study's own task folders (absolute), in lm-eval include_path order."""
        return [self.resolve(f) for f in self.eval.task_folders]

    def keyed(self, message: str) -> str:
        """A message that starts with one of the study file's keys (`search.fidelity.rungs:
        …`, found once the pool or the tasks are read) with the file in front, as the file's
        own checks give it."""
        key = re.split(r"[.:]", message, maxsplit=1)[0]
        if self.source is None or key not in type(self).model_fields or key in ("root", "source"):
            return message
        return f"{self.source}: {message}"

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p)

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    def missing_folders(self) -> list[tuple[str, Path]]:
        """(key, folder) for each folder the study names that is not on this machine."""
        missing = [("eval.tasks_dir", d) for d in self.task_dirs if not d.is_dir()]
        sqlite = self.sqlite_path
        if sqlite is not None and not sqlite.parent.is_dir():
            missing.append(("storage", sqlite.parent))
        return missing

    # -- writing ----------------------------------------------------------------------
    def relocated(self) -> StudySpec:
        """This study as read from another folder (a Ray job's working_dir): the pool, a
        SQLite storage, and task folders or local datasets outside the study's folder become
        absolute paths; those inside it stay relative, since they travel with the study file."""

        def absolute(text: str) -> str:
            if Path(text).is_absolute() or text.startswith("~"):
                return text
            return os.path.normpath(self.root / text)

        pool = self.pool.model_copy(
            update={
                "checkpoints": [absolute(c) for c in self.pool.checkpoints],
                **({} if self.pool.base is None else {"base": Path(absolute(str(self.pool.base)))}),
            }
        )
        update: dict[str, Any] = {"pool": pool}
        if self.storage_url != self.storage:
            update["storage"] = self.storage_url

        def travelling(path: Path) -> Path:
            # Inside the study's folder: relative, it travels with the study file.
            text = str(path)
            outside = Path(os.path.normpath(text)).parts[:1] == ("..",)
            return Path(absolute(text)) if absolute(text) != text and outside else path

        tasks_dir = self.eval.tasks_dir
        moved_tasks = (
            None
            if tasks_dir is None
            else [travelling(p) for p in tasks_dir]
            if isinstance(tasks_dir, list)
            else travelling(tasks_dir)
        )
        moved_data = {
            key: {
                split: [travelling(f) for f in files]
                if isinstance(files, list)
                else travelling(files)
                for split, files in source.items()
            }
            if isinstance(source, dict)
            else travelling(source)
            for key, source in self.eval.datasets.items()
        }
        moved_eval = {
            key: value
            for key, value, before in (
                ("tasks_dir", moved_tasks, tasks_dir),
                ("datasets", moved_data, self.eval.datasets),
            )
            if value != before
        }
        if moved_eval:
            update["eval"] = self.eval.model_copy(update=moved_eval)
        return self.model_copy(update=update)

    def to_yaml(self, header: str = "") -> str:
        """The study file's text: the keys it was given (defaults left out), after `header`."""
        return header + yaml.safe_dump(
            self.model_dump(mode="json", exclude_unset=True), sort_keys=False
        )

    def write(self, path: Path, header: str = "") -> Path:
        """Write the study file; an identical file is left untouched (its time stamp too)."""
        text = self.to_yaml(header)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        return path


def resolve_storage_url(url: str, root: Path) -> str:
    """sqlite:///rel.db → sqlite:////ROOT/rel.db; every other URL is left alone."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    rest = url[len(prefix) :]
    if rest.startswith("/") or rest.startswith(":memory:"):
        return url
    return prefix + str((root / rest).resolve())


def _not_tunable(param: str, method: str, tunable: Mapping[str, Any]) -> str:
    return (
        f"{param} is not a parameter of {method} that a search can tune "
        f"(tunable: {', '.join(tunable) or 'none'})"
    )


def _describe(error: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error → (dotted key, short message)."""
    loc = ".".join(str(p) for p in error.get("loc", ()))
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    exc = ctx.get("error")
    if isinstance(exc, KeyedError):
        return exc.key, exc.message
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        choices = ", ".join(re.findall(r"'([^']*)'", expected)) or expected
        return loc, f"must be one of {choices}"
    if kind == "extra_forbidden":
        return loc, "unknown key"
    if kind == "missing":
        return loc, "required"
    if kind == "value_error" and isinstance(exc, Exception):
        return loc, str(exc)
    message = str(error.get("msg", "invalid"))
    return loc, message[:1].lower() + message[1:]


def parse_study_spec(data: Any, path: Path, *, check_folders: bool = True) -> StudySpec:
    """A parsed YAML document → StudySpec (paths resolved against `path`'s folder).

    `check_folders`: also require the tasks folder and the SQLite file's folder here.
    """
    if not isinstance(data, dict):
        raise RecyclerError(f"{path}: the study file must be a YAML mapping of keys")
    for internal in ("root", "source"):
        if internal in data:
            raise RecyclerError(f"{path}: {internal}: unknown key")
    root = path.resolve().parent
    try:
        spec = StudySpec.model_validate({**data, "root": root, "source": path})
    except ValidationError as exc:
        errors = exc.errors()
        key, message = _describe(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RecyclerError(f"{path}: {key}: {message}{more}") from None
    if check_folders:
        for key, folder in spec.missing_folders():
            what = (
                "no such folder"
                if key == "eval.tasks_dir"
                else "no such folder for the SQLite file"
            )
            raise RecyclerError(f"{path}: {key}: {what}: {folder}")
    return spec


def load_study_spec(path: Path) -> StudySpec:
    """Read and validate a study file; RecyclerError naming the key on any problem."""
    return parse_study_spec(load_yaml(path, "study"), path)
