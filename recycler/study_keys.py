"""What every section of a study file is validated with: strict models (a misspelt key is
an error), errors that name their own key, and notes printed once per process."""

from __future__ import annotations

import re
import sys

from pydantic import BaseModel, ConfigDict


def matching(pattern: re.Pattern[str], value: str, message: str) -> str:
    if not pattern.match(value):
        raise ValueError(message)
    return value


class StrictModel(BaseModel):
    # A misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyedError(ValueError):
    """A cross-field error that names its own key rather than the model's."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


_noted: set[str] = set()


def note_once(message: str) -> None:
    """A note on stderr, once per process however often a study file is read."""
    if message not in _noted:
        _noted.add(message)
        print(f"recycler: note: {message}", file=sys.stderr)
