"""The one exception type that means "the user's input is wrong" (exit code 2)."""

from __future__ import annotations


class RecyclerError(Exception):
    """Bad input or configuration. The message is one line naming the file, tensor or field."""
