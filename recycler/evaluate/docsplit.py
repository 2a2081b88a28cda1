"""A seeded dev/test split of the documents lm-eval scores for a task that has no such splits.

Most benchmarks ship one scored split (`test`, else `validation`) and nothing to tune
on. recycler divides that split's documents in two by a rule that depends only on the
seed and the document index (a SHA-256 of both), so every worker, every resume and
every later `lm_eval --samples` run picks the same documents without storing them:
the dev part is the `round(n * fraction)` documents with the smallest hashes, the test
part is the rest. Few-shot examples keep coming from the task's own few-shot split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from recycler.errors import RecyclerError

MIN_DOCS = 10  # fewer documents in a part would make its score a coin toss
TEST = "test"


def _rank(seed: int, index: int | str) -> bytes:
    return hashlib.sha256(f"{seed}:{index}".encode()).digest()


def part_ids(n_docs: int, fraction: float, seed: int, part: str) -> list[int]:
    """The sorted document indices (0..n_docs-1) of `part` ("dev" or "test")."""
    order = sorted(range(n_docs), key=lambda i: _rank(seed, i))
    n_dev = round(n_docs * fraction)
    chosen = order[:n_dev] if part != TEST else order[n_dev:]
    return sorted(chosen)


def rung_ids(dev_ids: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Each rung's documents among `dev_ids` (sorted), for increasing `fractions` ending at 1.

    One seeded order of the dev documents, and rung k is its first `round(n * fraction_k)`:
    so every rung holds the rungs below it (nested), and every trial, worker and resume
    picks the same documents. Seeded apart from the dev/test split (its own salt).
    """
    order = sorted(dev_ids, key=lambda i: _rank(seed, f"rung:{i}"))
    return [sorted(order[: round(len(order) * f)]) for f in fractions]


def ids_digest(ids: Sequence[int]) -> str:
    """A short hash of a list of document ids."""
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


def docs_digest(docs: Iterable[Any]) -> str:
    """A short hash of the documents' content, in order: a changed dataset changes it."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(json.dumps(doc, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def check_sizes(task: str, source: str, n_docs: int, fraction: float) -> None:
    """RecyclerError when a part would hold fewer than MIN_DOCS documents."""
    n_dev = round(n_docs * fraction)
    for part, size in (("dev", n_dev), (TEST, n_docs - n_dev)):
        if size < MIN_DOCS:
            raise RecyclerError(
                f"eval.dev_fraction: task {task!r} has {n_docs} documents in its {source!r} "
                f"split; a dev fraction of {fraction} leaves {size} in the {part} part (at least "
                f"{MIN_DOCS} needed)"
            )
