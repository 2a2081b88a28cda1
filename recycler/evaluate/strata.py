"""Stratified evaluation (`eval.documents: stratified`): a trial scores the dev documents
that tell the pool's checkpoints apart, and a seeded sample of those they agree on.

Every study scores each checkpoint of its pool on every dev document first (the `singles`
baselines). A merge of those checkpoints mostly answers like them: where they all agree,
a merge rarely differs, and where all but one or two agree, it mostly goes with the rest
(exp-stratified: merges went with an 8-to-1 vote of 9 checkpoints on 96.9–100 % of such
documents). So a task's dev documents fall in strata by the checkpoints' per-document
values of the objectives' metrics: an `agreed` stratum per value every checkpoint scored
(for accuracy: all right, all wrong), one per value all but k scored, for k up to
`eval.sampled_dissent` of the checkpoints, and `contested`, the rest. A trial scores
every contested document and a seeded sample of each other stratum, and its score is the
stratified estimate (Cochran, *Sampling Techniques*, ch. 5): each stratum's sample mean
weighted by the stratum's size, unbiased for the score over every dev document, with its
standard error.

The error of a sampled stratum comes from its flips (documents where the merge differs
from the stratum's value): a sample without a flip says little about how rare they are,
so the variance used is never below that of a flip rate of (flips + 1) / (sampled + 2)
(Laplace's rule); the error is conservative where flips are rare, which is where the
estimate is already close. A sample whose flip rate passes FLIP_LIMIT is a merge far
from the pool (large task-arithmetic lambdas, extreme densities): its stratum is then
scored in full.

Only metrics that are a mean over documents can be estimated this way. A task is scored
in full when an objective on it reduces its documents otherwise (perplexity, corpus BLEU,
F1), or when it has fewer than MIN_TASK_DOCS dev documents; `full` says why for each.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lm_eval.api.metrics import mean

from recycler.evaluate import doc_scores
from recycler.evaluate.results import IDS, DocScores, parse_results

if TYPE_CHECKING:
    from recycler.evaluate.tasks import TaskSuite

CONTESTED = "contested"
# A sampled stratum's name: "agreed " + its values, and "(k of n dissent)" where k differ.
AGREED = "agreed"
# The fewest documents sampled from an agreed stratum (all of it where it has fewer): the
# flip count of a smaller sample is too coarse to judge the merge by.
MIN_AGREED_SAMPLE = 10
# A task with fewer dev documents is scored in full: its strata would be a handful each.
MIN_TASK_DOCS = 30
# Above this share of a stratum's sample flipped, the stratum is scored in full. Merges
# of the pool's own checkpoints flipped under 1 % of the documents every checkpoint
# agrees on and at most 3.1 % of those one of nine dissents on (experiments/README.md,
# exp-stratified); a rate this high means a merge far from the pool.
FLIP_LIMIT = 0.15


def score_key(entry: Mapping[str, Any], metric: str) -> str | None:
    """The per-document key of an objective's metric in a task's scores (`acc` finds
    `acc,none`), else None."""
    if metric in entry:
        return metric
    if "," not in metric:
        if f"{metric},none" in entry:
            return f"{metric},none"
        found = [k for k in entry if k != IDS and k.split(",", 1)[0] == metric]
        if len(found) == 1:
            return found[0]
    return None


def is_mean(task: Any, key: str) -> bool:
    """Whether lm-eval reduces the metric of `key` by the mean over documents."""
    return task.aggregation().get(key.split(",", 1)[0], mean) is mean


@dataclass(frozen=True)
class TaskPlan:
    """Which tasks are stratified, on which metrics, and which are scored in full (known
    before any score: from the objectives, lm-eval's aggregations and the dev documents)."""

    metrics: dict[str, list[str]]  # stratified leaf task -> the objectives' metrics on it
    full: dict[str, str]  # leaf task -> why it is scored in full
    dev_ids: dict[str, list[int]]  # every leaf task's dev documents (sorted)

    @classmethod
    def of(
        cls,
        suite: TaskSuite,
        objectives: Sequence[tuple[str, str]],
        dev_ids: Mapping[str, Sequence[int]],
    ) -> TaskPlan:
        """`objectives`: (task or group, metric) of each objective."""
        from recycler.evaluate.tasks import leaf_names

        metrics: dict[str, list[str]] = {}
        full: dict[str, str] = {}
        for task, metric in objectives:
            leaves = [task] if task in suite.leaves else leaf_names(suite.manager, task)
            for leaf in leaves:
                if leaf not in suite.leaves:
                    continue
                if not is_mean(suite.leaves[leaf], metric):
                    full[leaf] = f"{metric} is not a mean over documents"
                metrics.setdefault(leaf, []).append(metric)
        for leaf in suite.leaves:
            n = len(dev_ids[leaf])
            if leaf not in metrics:
                full.setdefault(leaf, "no objective reads it")
            elif n < MIN_TASK_DOCS:
                full.setdefault(leaf, f"{n} dev documents (fewer than {MIN_TASK_DOCS})")
        return cls(
            {t: m for t, m in metrics.items() if t not in full},
            full,
            {t: sorted(ids) for t, ids in dev_ids.items()},
        )

    def summary(self) -> list[str]:
        """One line per task scored in full, saying why."""
        return [f"task {t} is scored in full: {why}" for t, why in sorted(self.full.items())]


@dataclass(frozen=True)
class TaskStrata:
    """One task's strata: what they are defined on, their documents, and each agreed
    stratum's values (one per key, what every checkpoint scored)."""

    keys: list[str]  # the per-document score keys ("acc,none")
    docs: dict[str, list[int]]  # stratum -> its documents (sorted); CONTESTED first
    # Sampled stratum -> its value per key: what every checkpoint (or all but the few
    # dissenting ones) scored on its documents.
    agreed: dict[str, list[float]]

    @property
    def n_docs(self) -> int:
        return sum(len(ids) for ids in self.docs.values())


@dataclass(frozen=True)
class Strata:
    """A study's strata: per stratified task its `TaskStrata`, per task scored in full why,
    and each task's dev documents."""

    tasks: dict[str, TaskStrata]
    full: dict[str, str]  # task -> why it is scored in full
    dev_ids: dict[str, list[int]]
    checkpoints: list[str] = field(default_factory=list)  # the baselines they come from

    # ---- built once per study, from the checkpoints' per-document scores ---------------
    @classmethod
    def build(
        cls, plan: TaskPlan, checkpoint_scores: Mapping[str, DocScores], dissent: float = 0.0
    ) -> Strata:
        """The strata of `plan`'s tasks from `checkpoint_scores`: each checkpoint's scores
        on every dev document (ValueError where one lacks some). A document on which at
        most `dissent` of the checkpoints (a share) score other than the rest falls in a
        sampled stratum of the rest's value; one they split more evenly is contested."""
        if len(checkpoint_scores) < 2:
            raise ValueError("strata need the scores of at least two checkpoints")
        n_checkpoints = len(checkpoint_scores)
        # (+1e-9: 0.15 * 20 is 2.9999… in floating point.) Fewer than half may dissent.
        most = min(math.floor(dissent * n_checkpoints + 1e-9), (n_checkpoints - 1) // 2)
        dev_ids = plan.dev_ids
        tasks: dict[str, TaskStrata] = {}
        for task, metrics in sorted(plan.metrics.items()):
            per_checkpoint = []
            task_keys: list[str] = []
            for name, scores in sorted(checkpoint_scores.items()):
                entry = scores.get(task)
                if entry is None or entry[IDS] != dev_ids[task]:
                    raise ValueError(
                        f"checkpoint {name}: no scores of every dev document of {task}"
                    )
                task_keys = []
                for metric in metrics:
                    key = score_key(entry, metric)
                    if key is None:
                        raise ValueError(f"task {task}: no per-document scores of {metric}")
                    task_keys.append(key)
                per_checkpoint.append([entry[k] for k in task_keys])
            docs: dict[str, list[int]] = {CONTESTED: []}
            agreed: dict[str, list[float]] = {}
            for n, doc in enumerate(sorted(dev_ids[task])):
                votes = Counter(tuple(float(column[n]) for column in c) for c in per_checkpoint)
                value, count = votes.most_common(1)[0]
                others = n_checkpoints - count
                if others > most:
                    docs[CONTESTED].append(doc)
                    continue
                name = f"{AGREED} " + ",".join(f"{v:g}" for v in value)
                if others:
                    name += f" ({others} of {n_checkpoints} dissent)"
                docs.setdefault(name, []).append(doc)
                agreed[name] = list(value)
            tasks[task] = TaskStrata(list(task_keys), docs, agreed)
        return cls(tasks, dict(plan.full), dev_ids, sorted(checkpoint_scores))

    def record(self) -> dict[str, Any]:
        """Plain JSON, as the study stores it."""
        return {
            "tasks": {
                t: {"keys": s.keys, "docs": s.docs, "agreed": s.agreed}
                for t, s in self.tasks.items()
            },
            "full": self.full,
            "dev_ids": self.dev_ids,
            "checkpoints": self.checkpoints,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Strata:
        return cls(
            {
                t: TaskStrata(list(s["keys"]), dict(s["docs"]), dict(s["agreed"]))
                for t, s in record["tasks"].items()
            },
            dict(record["full"]),
            {t: list(ids) for t, ids in record["dev_ids"].items()},
            list(record.get("checkpoints", [])),
        )

    # ---- what a trial scores -----------------------------------------------------------
    def sample(self, fraction: float, seed: str) -> dict[str, list[int]]:
        """The documents a trial scores first: every document of a task scored in full,
        every contested one, and a seeded sample of each agreed stratum (`fraction` of
        it, at least MIN_AGREED_SAMPLE)."""
        out: dict[str, list[int]] = {}
        for task, ids in self.dev_ids.items():
            strata = self.tasks.get(task)
            if strata is None:
                out[task] = list(ids)
                continue
            chosen = list(strata.docs[CONTESTED])
            for name, docs in strata.docs.items():
                if name == CONTESTED:
                    continue
                k = min(len(docs), max(MIN_AGREED_SAMPLE, math.ceil(fraction * len(docs))))
                chosen += random.Random(f"{seed}:{task}:{name}").sample(docs, k)
            out[task] = sorted(chosen)
        return out

    def flipped(self, scores: DocScores, limit: float = FLIP_LIMIT) -> dict[str, list[int]]:
        """The unscored documents of every agreed stratum whose sample in `scores` flipped
        at a rate above `limit`: what a trial far from the pool scores next."""
        out: dict[str, list[int]] = {}
        for task, strata in self.tasks.items():
            entry = scores[task]
            position = {i: n for n, i in enumerate(entry[IDS])}
            for name, docs in strata.docs.items():
                if name == CONTESTED:
                    continue
                seen = [position[i] for i in docs if i in position]
                if len(seen) == len(docs):
                    continue
                flips = _flips(entry, strata.keys, strata.agreed[name], seen)
                if flips > limit * len(seen):
                    out.setdefault(task, []).extend(i for i in docs if i not in position)
        return {t: sorted(ids) for t, ids in out.items()}

    # ---- the estimate ------------------------------------------------------------------
    def estimate(self, suite: TaskSuite, scores: DocScores) -> Estimate:
        """The stratified estimate of every metric lm-eval would report over all dev
        documents (task and group -> metric -> value), and its standard error; exact (and
        an error of 0) for a task whose strata are scored in full. A metric that is not a
        mean over documents of a stratified task is left out: it cannot be estimated."""
        results: dict[str, dict[str, Any]] = {}
        errors: dict[str, dict[str, float]] = {}
        for name, task in suite.leaves.items():
            entry = scores[name]
            strata = self.tasks.get(name)
            if strata is None or entry[IDS] == self.dev_ids[name]:
                exact = doc_scores.aggregate_leaf(name, task, entry)
                results[name] = {**exact, "sample_len": len(self.dev_ids[name])}
                errors[name] = {k: 0.0 for k in exact if "," in k}
                continue
            results[name] = {"alias": name, "name": name, "sample_len": len(self.dev_ids[name])}
            errors[name] = {}
            for key in entry:
                if key == IDS or not is_mean(task, key):
                    continue
                results[name][key], errors[name][key] = _stratified(strata, entry, key)
        groups = list(suite.task_dict.get("groups", {}).values())
        for group in groups:
            results[group.name] = dict(group.aggregate(results))
        # A group's value is a weighted mean of its leaves': its error, each leaf's error
        # moved through that mean (exact for a linear aggregation).
        for group in groups:
            group_errors: dict[str, float] = {}
            for key, value in results[group.name].items():
                if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                    continue
                total = 0.0
                for leaf, leaf_errors in errors.items():
                    error = leaf_errors.get(key, 0.0)
                    if error == 0.0:
                        continue
                    moved = {**results, leaf: {**results[leaf], key: results[leaf][key] + error}}
                    total += (float(group.aggregate(moved).get(key, value)) - value) ** 2
                group_errors[key] = math.sqrt(total)
            errors[group.name] = group_errors
        return Estimate(
            metrics=parse_results(results),
            stderr=parse_results(errors),
            n_docs=doc_scores.n_docs(scores),
        )


@dataclass(frozen=True)
class Estimate:
    """A trial's estimated metrics (as `runner.evaluate_tasks` returns them), each one's
    standard error in the same form, and the documents scored."""

    metrics: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]]
    n_docs: int


def _flips(
    entry: Mapping[str, Any], keys: Sequence[str], agreed: Sequence[float], at: Sequence[int]
) -> int:
    """How many of the documents at positions `at` differ from the agreed values."""
    return sum(
        1 for n in at if any(float(entry[k][n]) != v for k, v in zip(keys, agreed, strict=True))
    )


def _stratified(strata: TaskStrata, entry: Mapping[str, Any], key: str) -> tuple[float, float]:
    """One metric's stratified estimate over a task's dev documents, and its standard error."""
    position = {i: n for n, i in enumerate(entry[IDS])}
    values = [float(v) for v in entry[key]]
    column = strata.keys.index(key) if key in strata.keys else None
    # How far a flip moves a document's value (1 for accuracy): what the floor scales by.
    span = max(values) - min(values)
    if column is not None:
        span = max([span, *(abs(v - a[column]) for a in strata.agreed.values() for v in values)])
    # Every scored value alike (an easy task): a flip still moves a 0/1 metric by 1.
    span = span or 1.0
    estimate, variance = 0.0, 0.0
    for name, docs in strata.docs.items():
        if not docs:
            continue
        sample = [values[position[i]] for i in docs if i in position]
        if not sample:
            raise ValueError(f"stratum {name} has no scored document")
        weight = len(docs) / strata.n_docs
        y = sum(sample) / len(sample)
        estimate += weight * y
        n, size = len(sample), len(docs)
        if n == size:
            continue
        s2 = sum((v - y) ** 2 for v in sample) / (n - 1) if n > 1 else 0.0
        # The agreed value (the sample's commonest for another metric of the task).
        usual = strata.agreed[name][column] if column is not None else max(sample, key=sample.count)
        rate = (sum(1 for v in sample if v != usual) + 1) / (n + 2)
        s2 = max(s2, rate * (1 - rate) * span**2)
        variance += weight**2 * (1 - n / size) * s2 / n
    return estimate, math.sqrt(variance)
