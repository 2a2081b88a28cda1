"""lm-eval's output in recycler's forms: its results block as task → metric → value, and
its logged samples as per-document scores (`DocScores`, combined by `doc_scores`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# {task: {"ids": [doc ids, ascending], "acc,none": [one value per id], …}}: plain JSON,
# stored on a trial as it is.
DocScores = dict[str, dict[str, list[Any]]]
IDS = "ids"


def parse_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's `results` block -> task -> metric -> float (stderrs, aliases and N/A dropped)."""
    parsed: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        values: dict[str, float] = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, (str, bool)):
                continue
            if not isinstance(value, (int, float)) or math.isnan(value):
                continue
            values[metric if filt == "none" else key] = float(value)
        parsed[task] = values
    return parsed


def doc_scores_of(samples: Mapping[str, Iterable[Mapping[str, Any]]]) -> DocScores:
    """lm-eval's logged samples (`evaluate(..., log_samples=True)["samples"]`) → DocScores."""
    out: DocScores = {}
    for task, logged in samples.items():
        by_key: dict[str, dict[int, Any]] = {}
        ids: set[int] = set()
        for example in logged:
            doc_id = int(example["doc_id"])
            ids.add(doc_id)
            for metric in example["metrics"]:
                by_key.setdefault(f"{metric},{example['filter']}", {})[doc_id] = _plain(
                    example[metric]
                )
        ordered = sorted(ids)
        entry: dict[str, list[Any]] = {IDS: ordered}
        for key, values in by_key.items():
            if len(values) != len(ordered):
                raise ValueError(f"task {task}: metric {key} is missing for some documents")
            entry[key] = [values[i] for i in ordered]
        out[task] = entry
    return out


def _plain(value: Any) -> Any:
    """A per-document value as JSON keeps it (tuples of corpus metrics become lists)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):  # e.g. f1's and mcc's predicted class, a numpy int
        return value.item()
    return value
