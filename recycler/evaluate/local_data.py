"""Local copies of lm-eval's datasets (`eval.datasets`), for clusters that cannot reach the Hub.

A task's YAML names its data by Hub id (`dataset_path`, `dataset_name`). For each task
whose data the study maps to a local copy, recycler writes a one-file overlay task:
`include:` the task's own YAML (so its prompts, filters and metrics are lm-eval's, unchanged)
plus `dataset_path`/`dataset_kwargs` that load the local files with a packaged `datasets`
builder (arrow, json, csv, parquet). The overlay folder is the last `include_path` of
lm-eval's TaskManager, and a later path overrides a task of the same name: groups and tags
that name the task pick up the overlay. Overlay folders are content-addressed, so every
worker writes the same one and none is ever rewritten in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from recycler.errors import RecyclerError

# What a study may map a task or a Hub dataset id to: a `save_to_disk` folder, or split -> file(s).
LocalSource = str | dict[str, list[str]] | dict[str, str]

_BUILDERS = {
    ".arrow": "arrow",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


@dataclass(frozen=True)
class LocalData:
    """One task's local copy: the `datasets` builder and its files by split."""

    key: str  # the eval.datasets key it came from
    builder: str
    data_files: dict[str, list[str]]

    @property
    def splits(self) -> list[str]:
        return list(self.data_files)


def _saved_splits(folder: Path) -> dict[str, list[str]] | None:
    """A `DatasetDict.save_to_disk` folder's arrow files by split, or None if it is not one."""
    index = folder / "dataset_dict.json"
    if not index.is_file():
        return None
    splits = json.loads(index.read_text()).get("splits", [])
    return {s: [str(p) for p in sorted((folder / s).glob("*.arrow"))] for s in splits}


def resolve_source(key: str, source: LocalSource, dataset_name: str | None) -> LocalData:
    """`eval.datasets[key]` as files by split; for a Hub id with configs,
    FOLDER/<dataset_name> may hold one."""
    if isinstance(source, str):
        folder = Path(source)
        if not folder.is_dir():
            raise RecyclerError(f"eval.datasets.{key}: no such folder: {folder}")
        found = _saved_splits(folder)
        if found is None and dataset_name:
            found = _saved_splits(folder / dataset_name)
        if found is None:
            where = f" or {folder / dataset_name}" if dataset_name else ""
            raise RecyclerError(
                f"eval.datasets.{key}: {folder}{where} is not a folder written by datasets' "
                "save_to_disk (no dataset_dict.json)"
            )
        return LocalData(key, "arrow", found)
    files_by_split = {s: [f] if isinstance(f, str) else list(f) for s, f in source.items()}
    builders = set()
    for split, files in files_by_split.items():
        for f in files:
            if not Path(f).is_file():
                raise RecyclerError(f"eval.datasets.{key}.{split}: no such file: {f}")
            suffix = Path(f).suffix.lower()
            if suffix not in _BUILDERS:
                raise RecyclerError(
                    f"eval.datasets.{key}.{split}: {f}: unknown file type (known: "
                    f"{', '.join(_BUILDERS)})"
                )
            builders.add(_BUILDERS[suffix])
    if len(builders) != 1:
        raise RecyclerError(
            f"eval.datasets.{key}: every file must be of one type (found: "
            f"{', '.join(sorted(builders))})"
        )
    return LocalData(key, builders.pop(), files_by_split)


def overlay_config(yaml_path: Path, task: str, data: LocalData) -> dict[str, Any]:
    """The overlay task: the task's own YAML, its data read from the local files."""
    return {
        "include": str(yaml_path),
        "task": task,
        "dataset_path": data.builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data.data_files},
    }


def write_overlay(configs: Mapping[str, dict[str, Any]]) -> Path:
    """A folder holding one YAML per overlay task, named by its content (written once,
    atomically)."""
    text = {name: yaml.safe_dump(cfg, sort_keys=True) for name, cfg in sorted(configs.items())}
    digest = hashlib.sha256(json.dumps(text, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"recycler-datasets-{digest}"
    if folder.is_dir():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    for i, (name, body) in enumerate(text.items()):
        (staging / f"overlay_{i:04d}.yaml").write_text(
            f"# {name}: local data (written by recycler)\n{body}"
        )
    try:
        os.rename(staging, folder)
    except OSError:  # another process wrote the same folder first
        for p in staging.iterdir():
            p.unlink()
        staging.rmdir()
    return folder
