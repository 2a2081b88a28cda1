"""Reading a user's YAML file (a recipe or a study) with one-line errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from recycler.errors import RecyclerError


def load_yaml(path: Path, kind: str) -> Any:
    """The parsed YAML of `path`; a RecyclerError naming the file (and line) otherwise."""
    return _parse(path, kind, yaml.safe_load)


def load_yaml_documents(path: Path, kind: str) -> list[Any]:
    """Every document of `path` (`---` between them), as `load_yaml` reads one."""
    return _parse(path, kind, lambda text: list(yaml.safe_load_all(text)))


def _parse(path: Path, kind: str, parse: Callable[[str], Any]) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecyclerError(f"{path}: no such {kind} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise RecyclerError(f"{path}: cannot read the {kind} file: {reason}") from None
    try:
        return parse(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecyclerError(f"{path}: YAML syntax error{where}: {problem}") from None
