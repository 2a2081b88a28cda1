"""What the search needs from whoever evaluates a recipe (recycler.cluster implements it).

The search hands over a recipe (the typed `merge.recipe.Recipe`, parsed once by the
search from what the trial stores) and a split, and gets scores back; it never sees a
tensor, a worker or Ray. `capacity` is how many evaluations may be in flight at once
(one per evaluation worker): the search keeps that many trials running and asks the
sampler for the next one as soon as any finishes.

This seam lives in `evaluate/`, below both sides: `search/` calls it and `cluster/`
implements it without either importing the other (the command wires the two).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from recycler.errors import RecyclerError
from recycler.evaluate.results import DocScores
from recycler.merge.recipe import Recipe


@dataclass
class EvalResult:
    """One evaluation: lm-eval's metrics (task → metric → value), or each document's scores
    when it scored chosen documents, or why it failed."""

    ok: bool
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    doc_scores: DocScores | None = None
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str | None = None


class Evaluator(Protocol):
    @property
    def capacity(self) -> int: ...

    def submit(
        self,
        ticket: int,
        recipe: Recipe,
        split: str,
        docs: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        """Start evaluating `recipe`; `ticket` comes back with the result. `docs`: score
        only these documents of each task (`TaskSuite.doc_ids`), and return each one's
        scores."""

    def wait(self) -> list[tuple[int, EvalResult]]:
        """Block until at least one submitted evaluation finishes; return all finished ones."""

    def close(self) -> None:
        """Release the workers (and the Ray cluster if this evaluator started it)."""


def lookup_metric(task_metrics: dict[str, float], metric: str) -> float | None:
    """`acc` finds lm-eval's `acc` or `acc,none` (its metric,filter key), else None."""
    if metric in task_metrics:
        return task_metrics[metric]
    if "," not in metric:
        if f"{metric},none" in task_metrics:
            return task_metrics[f"{metric},none"]
        found = [k for k in task_metrics if k.split(",", 1)[0] == metric]
        if len(found) == 1:
            return task_metrics[found[0]]
    return None


def describe_failure(exc: BaseException) -> str:
    """One line for a failed evaluation's reason: what failed and where, without a traceback
    dump."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if (
        isinstance(exc, MemoryError)
        or "OutOfMemoryError" in name
        or "out of memory" in text.lower()
    ):
        return f"out of memory: {text or name}"
    if isinstance(exc, RecyclerError):
        return text
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{name}: {text}{where}"
