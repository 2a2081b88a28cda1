"""What the commands share: argparse value checks (a bad value is argparse's one-line
error), and the hint that names `--force`."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from recycler.errors import RecyclerError
from recycler.export.model_dir import OutputExists

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def _integer(text: str, what: str = "an integer") -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def port(text: str) -> int:
    value = _integer(text, "a port number")
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be 1..65535, got {value}")
    return value


def size_in_bytes(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count → bytes."""
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    try:
        value = int(float(number) * _SIZE_UNITS[stripped[len(number) :]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size (e.g. 5GB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def device(text: str) -> str:
    if text != "cpu" and not text.startswith("cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu, cuda or cuda:N)")
    return text


@contextmanager
def force_hint() -> Iterator[None]:
    """An output folder that is not empty: say which flag replaces it."""
    try:
        yield
    except OutputExists as exc:
        raise RecyclerError(f"{exc} (use --force to replace it)") from None
