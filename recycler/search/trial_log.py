"""One line per finished trial, for a log that is not a terminal.

A search submitted as a Ray job is watched through `ray job logs --follow`: there a
progress bar redrawn in place says nothing about which trial finished with what. The
search's command prints these lines instead when its stderr is not a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recycler.search.baselines import GREEDY


@dataclass(frozen=True)
class FinishedTrial:
    """What a search trial ended with: its objective values, or the reason it failed."""

    number: int
    label: str  # the baseline's name, "greedy step", or "search"
    values: dict[str, float] | None  # None when it failed
    failure: str | None = None
    merge_seconds: float | None = (
        None  # None when nothing was merged (a cache hit, a refused recipe)
    )
    eval_seconds: float | None = None
    cache_hit: int | None = None  # the trial whose identical recipe's scores it reused


def trial_label(user_attrs: dict[str, Any]) -> str:
    """What a trial is, from its user attributes: a baseline's name, a greedy step, or the search's."""
    baseline = user_attrs.get("baseline")
    if baseline == GREEDY:
        return "greedy step"
    return str(baseline) if baseline else "search"


def trial_line(t: FinishedTrial) -> str:
    """`trial 7 [search] complete: quality=0.8125 cost=1.25 · merge 0.02 s · eval 1.31 s`."""
    head = f"trial {t.number} [{t.label}]"
    if t.values is None:
        lines = (t.failure or "").strip().splitlines()
        text = f"{head} failed: {lines[0] if lines else 'no reason given'}"
    else:
        scores = " ".join(f"{name}={value:.6g}" for name, value in t.values.items())
        cached = f" (scores of trial {t.cache_hit}, same recipe)" if t.cache_hit is not None else ""
        text = f"{head} complete{cached}: {scores}"
    if t.merge_seconds is not None:
        text += f" · merge {t.merge_seconds:.2f} s"
    if t.eval_seconds is not None:
        text += f" · eval {t.eval_seconds:.2f} s"
    return text
