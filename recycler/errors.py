"""The exception type that means "the user's input is wrong" (exit code 2)."""

from __future__ import annotations


class RecyclerError(Exception):
    """Bad input or configuration. The message is one line naming the file, tensor or field."""


class UnreachableError(RecyclerError):
    """A RecyclerError after which a thread stays blocked on something that never answered
    (a Ray cluster): the interpreter's exit would wait for it, so the command leaves at once."""
