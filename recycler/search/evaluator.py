"""What the search needs from whoever evaluates a recipe (recycler.cluster implements it).

The search hands over a recipe dict and a split, and gets scores back; it never sees a
tensor, a worker or Ray. `capacity` is how many evaluations may be in flight at once
(one per evaluation worker): the search keeps that many trials running and asks the
sampler for the next one as soon as any finishes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class EvalResult:
    """One evaluation: lm-eval's metrics (task → metric → value) or why it failed."""

    ok: bool
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    error: str | None = None


class Evaluator(Protocol):
    @property
    def capacity(self) -> int: ...

    def submit(self, ticket: int, recipe: dict[str, Any], split: str) -> None:
        """Start evaluating; `ticket` comes back with the result."""

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
