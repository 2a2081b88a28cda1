"""lm-eval task suites, indexed and built once per process and re-pointed at a split per call.

Building lm-eval tasks (indexing folders of YAMLs, loading their data) costs more than
scoring a tiny model on them, and a search evaluates the same tasks hundreds of times.
So a suite is cached by its request (names, folders, options) and a fingerprint of the
study's own task folders; between calls only which documents are scored changes.

Names are looked up in the study's own folders first; lm-eval's built-in registry is
indexed only when a name is not there (indexing it parses thousands of YAMLs).

Dev and test, per leaf task: a task whose data has a split named like the dev split
(`eval.split`) and a `test` split, neither being its few-shot source, is scored on those
(the demo pool's tasks). Every other task is scored on parts of the split lm-eval scores
(`test_split`, else `validation_split`), chosen by `docsplit` and handed to lm-eval as
`samples=` (document ids per task).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lm_eval.tasks
from lm_eval.api.group import Group
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import Kind

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.evaluate import docsplit
from recycler.evaluate.local_data import (
    LocalData,
    LocalSource,
    overlay_config,
    resolve_source,
    write_overlay,
)

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks.manager import TaskDict

FEWSHOT_SEED = 1234  # lm-eval's own default (simple_evaluate's fewshot_random_seed)


@dataclass(frozen=True)
class SuiteRequest:
    """What to build: names, where to find them, and the lm-eval options that change a score.

    Plain data (it pickles to every worker). Paths are absolute.
    """

    names: tuple[str, ...]
    include: tuple[str, ...] = ()  # the study's own task folders
    datasets: Mapping[str, LocalSource] = field(
        default_factory=dict
    )  # task or Hub id -> local copy
    num_fewshot: Mapping[str, int] = field(default_factory=dict)  # requested name -> shots
    gen_kwargs: Mapping[str, Any] | None = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    dev_split: str = "dev"
    dev_fraction: float = 0.5
    split_seed: int = 0
    # The folders (relative to lm-eval's tasks package) of the built-in YAMLs the names
    # use, when known (`pinned_request`); None: index lm-eval's whole registry.
    builtin_dirs: tuple[str, ...] | None = None

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)


class UnknownTaskError(RecyclerError):
    """A name lm-eval does not know; carries the closest names it does."""

    def __init__(self, name: str, closest: list[str]) -> None:
        self.name = name
        self.closest = closest
        hint = f" (closest: {', '.join(closest)})" if closest else ""
        super().__init__(f"unknown lm-eval task, group or tag {name!r}{hint}")


@dataclass(frozen=True)
class LeafSplit:
    """How one leaf task's dev and test documents are chosen."""

    named: bool  # True: the data's own dev/test splits; False: parts of `source`
    source: str  # the split lm-eval scores (derived) ...
    n_docs: int  # ... and its number of documents (0 for named splits)
    docs_digest: str = ""


@dataclass
class TaskSuite:
    """The built lm-eval objects for a request."""

    request: SuiteRequest
    manager: TaskManager
    requested: list[Task | Group]  # what the caller named, as lm-eval objects
    leaves: dict[str, Task]  # every task those expand to
    task_dict: TaskDict  # what lm-eval's `evaluate` takes, over the same objects
    splits: dict[str, LeafSplit]

    def use_split(self, part: str, limit: int | None = None) -> dict[str, list[int]] | None:
        """Point every task at `part` (the dev split's name, or "test").

        Returns lm-eval's `samples=` (document ids per task, `limit` applied), or None
        when every task is scored on a named split (then lm-eval's `limit` applies).
        """
        samples: dict[str, list[int]] = {}
        derived = not all(self.splits[n].named for n in self.leaves)
        for name, task in self.leaves.items():
            # The few-shot sampler draws from one generator per task, which a cached task
            # would carry from one evaluation to the next: reseeded, every evaluation of
            # the same documents gets the same few-shot examples (as simple_evaluate's run).
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
            how = self.splits[name]
            if how.named:
                splits = list(task.dataset.keys()) if hasattr(task.dataset, "keys") else []
                if part not in splits:
                    raise RecyclerError(
                        f"task {name!r} has no split {part!r} (it has: "
                        f"{', '.join(splits) or 'none'})"
                    )
                task.config.test_split = part
                if derived:  # lm-eval takes `samples` or `limit`, not both: name every document
                    samples[name] = list(range(len(task.eval_docs)))
            else:
                if part not in (self.request.dev_split, docsplit.TEST):
                    raise RecyclerError(
                        f"task {name!r} is split into {self.request.dev_split!r} and "
                        f"{docsplit.TEST!r}, not {part!r}"
                    )
                task.config.test_split = how.source
                which = docsplit.TEST if part == docsplit.TEST else "dev"
                samples[name] = docsplit.part_ids(
                    how.n_docs, self.request.dev_fraction, self.request.split_seed, which
                )
        if not derived:
            return None
        return {n: ids[:limit] if limit is not None else ids for n, ids in samples.items()}

    def doc_ids(self, part: str, limit: int | None = None) -> dict[str, list[int]]:
        """Every leaf task's documents scored on `part` (indices into its split, sorted):
        the `samples=` that scores exactly what `use_split(part, limit)` does."""
        samples = self.use_split(part, limit)
        if samples is not None:
            return samples
        return {
            name: list(range(len(task.eval_docs)))[:limit] for name, task in self.leaves.items()
        }

    def split_records(self) -> dict[str, dict[str, Any]]:
        """Per leaf task, which documents dev and test are (what a study stores and a resume
        checks)."""
        out: dict[str, dict[str, Any]] = {}
        req = self.request
        for name, how in sorted(self.splits.items()):
            if how.named:
                out[name] = {"splits": [req.dev_split, docsplit.TEST]}
                continue
            dev = docsplit.part_ids(how.n_docs, req.dev_fraction, req.split_seed, "dev")
            out[name] = {
                "source": how.source,
                "docs": how.n_docs,
                "seed": req.split_seed,
                "fraction": req.dev_fraction,
                "dev_docs": len(dev),
                "dev_ids_sha256": docsplit.ids_digest(dev),
                "docs_sha256": how.docs_digest,
            }
        return out


_SUITES: dict[tuple[str, tuple[tuple[str, int], ...]], TaskSuite] = {}


def _fingerprint(folders: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    # A rebuilt folder at the same path (tests, `zoo build` after a delete) must
    # not be served from a stale cache: key on every file's mtime.
    out: list[tuple[str, int]] = []
    for folder in folders:
        root = Path(folder)
        out.extend(
            (str(p), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        )
    return tuple(out)


def folder_request(tasks_dir: Path, names: list[str], dev_split: str = "dev") -> SuiteRequest:
    """A request for tasks of one folder, without options (the demo pool's scorer)."""
    return SuiteRequest(
        names=tuple(dict.fromkeys(names)),
        include=(str(Path(tasks_dir).resolve()),),
        dev_split=dev_split,
    )


def suite_request(spec: StudySpec) -> SuiteRequest:
    """What a study's evaluation workers build: its objectives' tasks and every eval option."""
    datasets: dict[str, LocalSource] = {}
    for key, source in spec.eval.datasets.items():
        if isinstance(source, dict):
            datasets[key] = {
                split: [
                    str(spec.resolve(f)) for f in (files if isinstance(files, list) else [files])
                ]
                for split, files in source.items()
            }
        else:
            datasets[key] = str(spec.resolve(source))
    ev = spec.eval
    return SuiteRequest(
        names=tuple(dict.fromkeys(o.task for o in spec.objectives)),
        include=tuple(str(d.resolve()) for d in spec.task_dirs),
        datasets=datasets,
        num_fewshot={o.task: o.num_fewshot for o in spec.objectives if o.num_fewshot is not None},
        gen_kwargs=ev.gen_kwargs,
        apply_chat_template=ev.apply_chat_template,
        fewshot_as_multiturn=(
            ev.apply_chat_template if ev.fewshot_as_multiturn is None else ev.fewshot_as_multiturn
        ),
        dev_split=ev.split,
        dev_fraction=ev.dev_fraction,
        split_seed=ev.split_seed,
    )


def load_suite(request: SuiteRequest) -> TaskSuite:
    """The cached suite for `request`; built on first use."""
    for folder in request.include:
        if not Path(folder).is_dir():
            raise RecyclerError(f"eval.tasks_dir: {folder} is not a directory")
    if not request.names:
        raise RecyclerError("no tasks to evaluate")
    key = (request.key(), _fingerprint(request.include))
    suite = _SUITES.get(key)
    if suite is None:
        for old in [k for k in _SUITES if k[0] == key[0]]:
            del _SUITES[old]  # the folder changed: drop its stale suite
        suite = _build(request)
        _SUITES[key] = suite
    return suite


class _DropHints(logging.Filter):
    # lm-eval logs a hint about passing metadata for every task that loads its data
    # with `custom_dataset` (the zoo's tasks do), and a warning for each task an overlay
    # replaces (recycler's local-data overlays do so on purpose).
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return (
            "Custom kwargs can be passed" not in message
            and "overrides existing task" not in message
        )


def pinned_request(request: SuiteRequest) -> SuiteRequest:
    """The same request with the folders of the built-in YAMLs it uses named explicitly.

    A worker given it indexes those few folders instead of lm-eval's whole registry
    (seconds per process); the driver, which has indexed the registry already, makes it.
    """
    if request.builtin_dirs is not None:
        return request
    _, paths = _managers(request)
    if paths is None:
        return request
    package = _builtin_root()
    builtin = tuple(
        str(Path(p).relative_to(package)) for p in paths if Path(p).is_relative_to(package)
    )
    return replace(request, builtin_dirs=builtin)


def _builtin_root() -> Path:
    return Path(lm_eval.tasks.__file__).resolve().parent


def _build(request: SuiteRequest) -> TaskSuite:
    hint = _DropHints()
    loggers = [logging.getLogger(n) for n in ("lm_eval.api.task", "lm_eval.tasks._index")]
    for lg in loggers:
        lg.addFilter(hint)
    try:
        return _build_suite(request)
    finally:
        for lg in loggers:
            lg.removeFilter(hint)


_REGISTRIES: dict[tuple[str, ...], TaskManager] = {}


def _registry(include: tuple[str, ...]) -> TaskManager:
    """lm-eval's built-in tasks and the study's folders, indexed once per process (it takes
    seconds)."""
    key = (*include, *(str(p) for p in _fingerprint(include)))
    if key not in _REGISTRIES:
        _REGISTRIES.clear()
        _REGISTRIES[key] = TaskManager(include_path=list(include) or None, include_defaults=True)
    return _REGISTRIES[key]


def _closure(manager: TaskManager, names: tuple[str, ...]) -> list[str]:
    """Every index name the given ones need: themselves, and what their groups and tags list."""
    out: list[str] = []
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in out or name not in manager.task_index:
            continue
        out.append(name)
        todo.extend(_members(manager, name) or [])
    return out


def _managers(request: SuiteRequest) -> tuple[TaskManager, list[str] | None]:
    """A manager that knows every name (for look-ups and suggestions), and the include
    paths of a small one that knows the names needed: the study's folders, preceded by
    the folders of the built-in YAMLs they use (their own tasks override built-in ones).
    None for the paths when the names need more than the index lists (inline group members)."""
    if request.builtin_dirs is not None:
        pinned = [*(str(_builtin_root() / d) for d in request.builtin_dirs), *request.include]
        return TaskManager(include_path=pinned, include_defaults=False), pinned
    if request.include:
        own = TaskManager(include_path=list(request.include), include_defaults=False)
        if all(_complete(own, n) for n in request.names):
            return own, list(request.include)
    registry = _registry(request.include)
    if not all(_complete(registry, n) for n in request.names):
        return registry, None
    own_roots = [Path(p).resolve() for p in request.include]
    folders: list[str] = []
    for name in _closure(registry, request.names):
        path = registry.task_index[name].yaml_path
        if path is None or any(Path(path).resolve().is_relative_to(r) for r in own_roots):
            continue
        folder = str(Path(path).resolve().parent)
        if folder not in folders:
            folders.append(folder)
    return registry, [*sorted(folders), *request.include]


def _members(manager: TaskManager, name: str) -> list[str] | None:
    """The names a group or tag lists (None for a task, or a name not in the index)."""
    entry = manager.task_index.get(name)
    if entry is None or entry.kind not in (Kind.GROUP, Kind.TAG):
        return None
    if entry.kind == Kind.TAG:
        return sorted(entry.tags)
    members = (entry.cfg or {}).get("task") or []
    out: list[str] = []
    for item in members if isinstance(members, list) else [members]:
        child = item.get("task") or item.get("group") if isinstance(item, dict) else item
        if isinstance(child, str):
            out.append(child)
    return out


def _complete(manager: TaskManager, name: str) -> bool:
    """Whether `name` and everything it lists are in the manager's index."""
    if name not in manager.task_index:
        return False
    return all(_complete(manager, m) for m in _members(manager, name) or [])


def leaf_names(manager: TaskManager, name: str) -> list[str]:
    """The registered tasks a task, group or tag name expands to, read from lm-eval's index."""
    if name not in manager.task_index:
        return []
    members = _members(manager, name)
    if members is None:
        return [name]
    return list(dict.fromkeys(leaf for m in members for leaf in leaf_names(manager, m)))


def _local_data(manager: TaskManager, request: SuiteRequest) -> dict[str, tuple[Path, LocalData]]:
    """Leaf task -> (its YAML, its local copy), for the leaves `eval.datasets` maps."""
    out: dict[str, tuple[Path, LocalData]] = {}
    if not request.datasets:
        return out
    index = manager.task_index
    for name in request.names:
        for leaf in leaf_names(manager, name):
            entry = index[leaf]
            cfg = entry.cfg or {}
            hub_id = cfg.get("dataset_path")
            key = (
                leaf if leaf in request.datasets else hub_id if hub_id in request.datasets else None
            )
            if key is None or entry.yaml_path is None:
                continue
            data = resolve_source(
                key, request.datasets[key], cfg.get("dataset_name") if key == hub_id else None
            )
            _check_splits(leaf, cfg, data, _shots_for(manager, request, leaf))
            out[leaf] = (Path(entry.yaml_path), data)
    return out


def _shots_for(manager: TaskManager, request: SuiteRequest, leaf: str) -> int | None:
    for name, shots in request.num_fewshot.items():
        if leaf in leaf_names(manager, name):
            return shots
    return None


def _check_splits(task: str, cfg: dict[str, Any], data: LocalData, shots: int | None) -> None:
    """A local copy must hold the splits the task reads: the scored one, and the few-shot one
    if used."""
    scored = cfg.get("test_split") or cfg.get("validation_split")
    needed = [scored] if scored else []
    if (shots if shots is not None else cfg.get("num_fewshot") or 0) > 0:
        fewshot = (
            cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
        )
        if fewshot:
            needed.append(fewshot)
    for split in needed:
        if split not in data.data_files:
            raise RecyclerError(
                f"eval.datasets.{data.key}: the local copy has no split {split!r}, which task "
                f"{task!r} reads (it has: {', '.join(data.splits) or 'none'})"
            )


def _unloadable(
    manager: TaskManager, request: SuiteRequest, mapped: set[str], exc: BaseException
) -> RecyclerError:
    """The one line for a task whose data could not be loaded: name the task, its Hub id, the
    key to set."""
    cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    for name in request.names:
        for leaf in leaf_names(manager, name):
            if leaf in mapped:
                continue
            entry = manager.task_index[leaf]
            hub_id = (entry.cfg or {}).get("dataset_path")
            if hub_id and not (entry.cfg or {}).get("custom_dataset"):
                return RecyclerError(
                    f"task {leaf!r}: cannot load its dataset {hub_id!r} ({cause}); on a machine "
                    f"without the Hub set eval.datasets.{leaf} (or eval.datasets[{hub_id!r}]) to "
                    "a local copy"
                )
    return RecyclerError(f"cannot build tasks {', '.join(request.names)}: {cause}")


def _build_suite(request: SuiteRequest) -> TaskSuite:
    lookup, paths = _managers(request)
    for name in request.names:
        if name not in lookup.all_tasks:
            raise UnknownTaskError(
                name, difflib.get_close_matches(name, lookup.all_tasks, n=3, cutoff=0.6)
            )
    local = _local_data(lookup, request)
    overlay = (
        [
            str(
                write_overlay(
                    {leaf: overlay_config(path, leaf, data) for leaf, (path, data) in local.items()}
                )
            )
        ]
        if local
        else []
    )
    if paths is not None:
        manager = TaskManager(include_path=[*paths, *overlay], include_defaults=False)
    if paths is None or not all(_complete(manager, n) for n in request.names):
        manager = TaskManager(
            include_path=[*request.include, *overlay] or None, include_defaults=True
        )
    requested: list[Task | Group] = []
    try:
        for name in request.names:
            loaded = manager.load([name])
            if name in loaded.get("groups", {}):
                requested.append(loaded["groups"][name])
            else:  # a task, or a tag (expands to several tasks)
                requested.extend(loaded["tasks"].values())
    except RecyclerError:
        raise
    except Exception as exc:  # datasets' many errors: no network, no such file, a bad config
        raise _unloadable(manager, request, set(local), exc) from None
    # A task named alone and inside a named group would be built twice and
    # scored twice: keep the group's copy (its results list the task anyway).
    in_groups = {t.task_name for g in requested if isinstance(g, Group) for t in g.get_all_tasks()}
    requested = [r for r in requested if isinstance(r, Group) or r.task_name not in in_groups]
    leaves: dict[str, Task] = {}
    for item in requested:
        for task in item.get_all_tasks() if isinstance(item, Group) else [item]:
            leaves[task.task_name] = task
    _apply_options(manager, request, leaves)
    splits = {name: _leaf_split(name, task, request) for name, task in leaves.items()}
    # Given built objects, load() only arranges them (tasks, groups, group_map).
    return TaskSuite(request, manager, requested, leaves, manager.load(list(requested)), splits)


def _apply_options(manager: TaskManager, request: SuiteRequest, leaves: dict[str, Task]) -> None:
    """What simple_evaluate does to tasks before scoring, done once per build."""
    shots: dict[str, int] = {}
    for name, n in request.num_fewshot.items():
        for leaf in leaf_names(manager, name) or [name]:
            shots[leaf] = n
    for name, task in leaves.items():
        if name in shots:
            task.set_config(key="num_fewshot", value=shots[name])
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)  # zero-shot unless the YAML says otherwise
        if request.gen_kwargs and task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value=dict(request.gen_kwargs), update=True)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)


def _leaf_split(name: str, task: Task, request: SuiteRequest) -> LeafSplit:
    """Named dev/test splits when the data has them (and they are not the few-shot source),
    else a derived split."""
    splits = list(task.dataset.keys()) if hasattr(task.dataset, "keys") else []
    config = task.config
    fewshot_sources = {config.fewshot_split, config.training_split}
    if (
        request.dev_split in splits
        and docsplit.TEST in splits
        and not fewshot_sources & {request.dev_split, docsplit.TEST}
    ):
        return LeafSplit(named=True, source="", n_docs=0)
    source = config.test_split or config.validation_split
    if not source:
        raise RecyclerError(
            f"task {name!r} names neither a test_split nor a validation_split to score"
        )
    if source not in splits:
        raise RecyclerError(
            f"task {name!r}: its data has no split {source!r} to score (it has: "
            f"{', '.join(splits) or 'none'})"
        )
    config.test_split = source
    docs = task.eval_docs
    n_docs = len(docs)
    docsplit.check_sizes(name, source, n_docs, request.dev_fraction)
    return LeafSplit(
        named=False, source=source, n_docs=n_docs, docs_digest=docsplit.docs_digest(docs)
    )


@dataclass(frozen=True)
class MetricInfo:
    """What a task or group reports: metric -> higher_is_better, and its filter names."""

    directions: dict[str, bool]
    filters: tuple[str, ...]


def metric_info(request: SuiteRequest) -> dict[str, MetricInfo]:
    """task or group name -> its metrics (with lm-eval's higher_is_better) and filters.

    A group's metrics and filters are those its tasks share; a group metric is
    higher-is-better when it is so for every task in the group.
    """
    suite = load_suite(request)
    out: dict[str, MetricInfo] = {}
    for name, task in suite.leaves.items():
        filters = tuple(
            f["name"] for f in (task.config.filter_list or []) if isinstance(f, dict)
        ) or ("none",)
        out[name] = MetricInfo({m: bool(v) for m, v in task.higher_is_better().items()}, filters)
    for item in suite.requested:
        if isinstance(item, Group):
            members = [out[t.task_name] for t in item.get_all_tasks()]
            shared = set.intersection(*(set(m.directions) for m in members)) if members else set()
            filters_shared = (
                set.intersection(*(set(m.filters) for m in members)) if members else set()
            )
            out[item.name] = MetricInfo(
                {m: all(d.directions[m] for d in members) for m in sorted(shared)},
                tuple(sorted(filters_shared)),
            )
    return out


def describe(suite: TaskSuite) -> dict[str, Any]:
    """A short, JSON-able summary: names, leaf tasks and their splits' sizes."""
    return {
        "include": list(suite.request.include),
        "names": list(suite.request.names),
        "leaves": {n: {s: len(t.dataset[s]) for s in t.dataset} for n, t in suite.leaves.items()},
    }
