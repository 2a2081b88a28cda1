"""Per-document scores: what lm-eval scored each document, kept so that scores of separate
runs over disjoint documents combine into the score of one run over all of them.

A multi-fidelity trial is scored a rung at a time, each run on the documents the rung
adds. lm-eval reduces a task's per-document values with the task's own aggregation
(a mean for `acc`, a corpus BLEU for `bleu`, …) and a group's tasks with the group's
`aggregate_metric_list`: neither is a function of the parts' aggregates in general, so
the parts keep their per-document values (lm-eval's logged samples) and `aggregate`
applies lm-eval's own reductions to their union, in document order, as one run over the
union would (the same values in the same order: the same floats).

A document's values are the same in any run when its prompt is: always for a zero-shot
task, and for few-shot examples chosen by the document's position (`first_n`, as MMLU
does). lm-eval's default few-shot sampler draws from a seeded generator document after
document, so there a part's documents get other (equally random) examples than in one
run over the union; every trial of a study still gets the same ones per document,
since every trial's rungs are scored in the same evaluations.

The scores are plain JSON (`results.DocScores`), stored on the trial so that a resumed
search loses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lm_eval.api.metrics import mean

from recycler.evaluate.results import IDS, DocScores, parse_results

if TYPE_CHECKING:
    from recycler.evaluate.tasks import TaskSuite


def merged(a: DocScores, b: DocScores) -> DocScores:
    """The union of two parts scored on disjoint documents (a document in both: refused)."""
    out: DocScores = {}
    for task in sorted(set(a) | set(b)):
        left, right = a.get(task), b.get(task)
        if left is None or right is None:
            out[task] = dict(left or right or {})
            continue
        if set(left) != set(right):
            raise ValueError(f"task {task}: the parts have different metrics")
        both = set(left[IDS]) & set(right[IDS])
        if both:
            raise ValueError(f"task {task}: document {min(both)} was scored twice")
        ids = sorted([*left[IDS], *right[IDS]])
        entry: dict[str, list[Any]] = {IDS: ids}
        for key in (k for k in left if k != IDS):
            by_id = dict(zip(left[IDS], left[key])) | dict(zip(right[IDS], right[key]))
            entry[key] = [by_id[i] for i in ids]
        out[task] = entry
    return out


def restricted(scores: DocScores, docs: Mapping[str, Sequence[int]]) -> DocScores | None:
    """The scores of `docs` only; None when some document of `docs` was not scored."""
    out: DocScores = {}
    for task, wanted in docs.items():
        entry = scores.get(task)
        if entry is None:
            return None
        position = {i: n for n, i in enumerate(entry[IDS])}
        if any(i not in position for i in wanted):
            return None
        keep = [position[i] for i in sorted(wanted)]
        out[task] = {key: [values[n] for n in keep] for key, values in entry.items()}
    return out


def n_docs(scores: DocScores) -> int:
    """How many documents the scores cover, summed over tasks."""
    return sum(len(entry[IDS]) for entry in scores.values())


def aggregate_leaf(name: str, task: Any, entry: Mapping[str, list[Any]]) -> dict[str, Any]:
    """A leaf task's results block (lm-eval's form) for a run over exactly the documents
    of `entry`, reduced by the task's own aggregations."""
    reductions = task.aggregation()
    metrics: dict[str, Any] = {"alias": name, "name": name, "sample_len": len(entry[IDS])}
    for key, values in entry.items():
        if key == IDS:
            continue
        # lm-eval reduces a metric without an aggregation by its mean, too.
        metrics[key] = reductions.get(key.split(",", 1)[0], mean)(values)
    return metrics


def aggregate(suite: TaskSuite, scores: DocScores) -> dict[str, dict[str, float]]:
    """The metrics lm-eval reports for a run over exactly the documents in `scores`:
    task (and group) → metric → value, as `runner.evaluate_tasks` returns them."""
    results: dict[str, dict[str, Any]] = {}
    for name, task in suite.leaves.items():
        entry = scores.get(name)
        if entry is None:
            raise ValueError(f"no document scores for task {name}")
        results[name] = aggregate_leaf(name, task, entry)
    # A group aggregates its leaf tasks (however deep), so groups need no order here.
    for group in suite.task_dict.get("groups", {}).values():
        results[group.name] = dict(group.aggregate(results))
    return parse_results(results)
