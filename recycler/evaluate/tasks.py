"""lm-eval task suites, indexed and built once per process and re-pointed at a split per call.

Building lm-eval tasks (indexing a folder of YAMLs, loading their data) costs
more than scoring a tiny model on them, and a search evaluates the same tasks
hundreds of times. So a suite is cached by its folder, its task names and a
fingerprint of the folder's files; between calls only each task's
`test_split` changes (DESIGN.md: recycler picks the split by overriding it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval.api.group import Group
from lm_eval.tasks import TaskManager

from recycler.errors import RecyclerError

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks.manager import TaskDict


@dataclass
class TaskSuite:
    """The built lm-eval objects for some task/group names of one tasks folder."""

    tasks_dir: Path
    names: tuple[str, ...]
    manager: TaskManager
    requested: list[Task | Group]  # what the caller named, as lm-eval objects
    leaves: dict[str, Task]  # every task those expand to
    task_dict: TaskDict  # what lm-eval's `evaluate` takes, over the same objects

    def use_split(self, split: str) -> None:
        """Point every task at `split` (lm-eval scores a task's test split)."""
        for name, task in self.leaves.items():
            splits = list(task.dataset.keys()) if hasattr(task.dataset, "keys") else []
            if split not in splits:
                raise RecyclerError(
                    f"task {name!r} in {self.tasks_dir} has no split {split!r} (it has: {', '.join(splits) or 'none'})"
                )
            task.config.test_split = split


_SUITES: dict[tuple[str, tuple[str, ...], tuple[tuple[str, int], ...]], TaskSuite] = {}


def _fingerprint(tasks_dir: Path) -> tuple[tuple[str, int], ...]:
    # A rebuilt folder at the same path (tests, `zoo build` after a delete) must
    # not be served from a stale cache: key on every file's mtime.
    return tuple(
        (str(p.relative_to(tasks_dir)), p.stat().st_mtime_ns)
        for p in sorted(tasks_dir.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    )


def load_suite(tasks_dir: Path, tasks: list[str]) -> TaskSuite:
    """The cached suite for `tasks` (task or group names) in `tasks_dir`; built on first use."""
    tasks_dir = Path(tasks_dir).resolve()
    if not tasks_dir.is_dir():
        raise RecyclerError(f"eval.tasks_dir: {tasks_dir} is not a directory")
    if not tasks:
        raise RecyclerError("no tasks to evaluate")
    names = tuple(dict.fromkeys(tasks))
    key = (str(tasks_dir), names, _fingerprint(tasks_dir))
    suite = _SUITES.get(key)
    if suite is None:
        for old in [k for k in _SUITES if k[0] == key[0] and k[1] == names]:
            del _SUITES[old]  # the folder changed: drop its stale suite
        suite = _build(tasks_dir, names)
        _SUITES[key] = suite
    return suite


class _DropCustomDatasetHint(logging.Filter):
    # lm-eval logs a hint about passing metadata for every task that loads its
    # data with `custom_dataset` (the zoo's tasks do): advice for its CLI users.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _build(tasks_dir: Path, names: tuple[str, ...]) -> TaskSuite:
    task_logger = logging.getLogger("lm_eval.api.task")
    hint = _DropCustomDatasetHint()
    task_logger.addFilter(hint)
    try:
        return _build_suite(tasks_dir, names)
    finally:
        task_logger.removeFilter(hint)


def _build_suite(tasks_dir: Path, names: tuple[str, ...]) -> TaskSuite:
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        known = ", ".join(manager.all_tasks) or "none"
        raise RecyclerError(f"unknown task {unknown[0]!r} in {tasks_dir} (known: {known})")
    requested: list[Task | Group] = []
    for name in names:
        loaded = manager.load([name])
        if name in loaded.get("groups", {}):
            requested.append(loaded["groups"][name])
        else:  # a task, or a tag (expands to several tasks)
            requested.extend(loaded["tasks"].values())
    # A task named alone and inside a named group would be built twice and
    # scored twice: keep the group's copy (its results list the task anyway).
    in_groups = {t.task_name for g in requested if isinstance(g, Group) for t in g.get_all_tasks()}
    requested = [r for r in requested if isinstance(r, Group) or r.task_name not in in_groups]
    leaves: dict[str, Task] = {}
    for item in requested:
        for task in item.get_all_tasks() if isinstance(item, Group) else [item]:
            leaves[task.task_name] = task
    for task in leaves.values():
        # What simple_evaluate would do on every call, done once: zero-shot
        # unless the YAML says otherwise, and a fixed few-shot seed.
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    # Given built objects, load() only arranges them (tasks, groups, group_map).
    return TaskSuite(tasks_dir, names, manager, requested, leaves, manager.load(list(requested)))


def metric_directions(tasks_dir: Path, tasks: list[str]) -> dict[str, dict[str, bool]]:
    """task or group name -> metric -> higher_is_better, as lm-eval's task configs declare it.

    A group's metrics are those its tasks share; a group metric is higher-is-better
    when it is so for every task in the group.
    """
    suite = load_suite(tasks_dir, tasks)
    out: dict[str, dict[str, bool]] = {}
    for name, task in suite.leaves.items():
        out[name] = {m: bool(v) for m, v in task.higher_is_better().items()}
    for item in suite.requested:
        if isinstance(item, Group):
            members = [out[t.task_name] for t in item.get_all_tasks()]
            shared = set.intersection(*(set(m) for m in members)) if members else set()
            out[item.name] = {m: all(d[m] for d in members) for m in sorted(shared)}
    return out


def describe(suite: TaskSuite) -> dict[str, Any]:
    """A short, JSON-able summary: names, leaf tasks and their splits' sizes."""
    return {
        "tasks_dir": str(suite.tasks_dir),
        "names": list(suite.names),
        "leaves": {n: {s: len(t.dataset[s]) for s in t.dataset} for n, t in suite.leaves.items()},
    }
