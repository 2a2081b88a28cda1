"""A stored study, summarised: its Pareto set, knee, baselines, hypervolume, on dev or test.

The Pareto set is always chosen on the dev split (what the search optimised); `split`
only says which scores are shown and compared: on test, the same members' held-out
scores against the baselines' held-out scores. The hypervolume's reference point is the
worst value of each objective over the trials scored on that split, so the number is
comparable between trials of one study, not between studies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from recycler.search import front as pareto
from recycler.search.baselines import baseline_name, is_final_baseline
from recycler.search.budget import cost_of
from recycler.search.stored import StudyView, TrialRecord


@dataclass
class Member:
    record: TrialRecord
    values: list[float] | None  # on the chosen split; None when not scored on it
    label: str  # baseline name, or "search"
    dominates: list[str] = field(default_factory=list)
    is_knee: bool = False
    # On dev, an estimated trial's standard error per objective (eval.documents: stratified).
    stderr: list[float] | None = None


@dataclass
class FrontSummary:
    split: str
    objectives: list[str]
    maximize: list[bool]
    members: list[Member]
    baselines: list[Member]
    knee: int | None  # trial number
    hypervolume: float | None
    reference: list[float] | None
    n_complete: int
    n_failed: int
    n_trials: int
    n_pruned: int  # multi-fidelity trials stopped before the last rung
    cost: float  # full-trial equivalents of documents scored
    eval_seconds: float  # summed over every trial's evaluations
    n_estimated: int = 0  # complete trials told a stratified estimate (on sampled documents)

    def trial_counts(self) -> str:
        """`12 trials (5 complete, 7 pruned, 0 failed)` (pruned only in a multi-fidelity
        study; `9 complete (6 of them estimated)` in a stratified one)."""
        pruned = f", {self.n_pruned} pruned" if self.n_pruned else ""
        estimated = f", {self.n_estimated} of them estimated" if self.n_estimated else ""
        return (
            f"{self.n_trials} trials ({self.n_complete} complete{estimated}{pruned}, "
            f"{self.n_failed} failed)"
        )

    def cost_line(self) -> str:
        """What the search spent: full-trial equivalents of documents, and evaluation time."""
        return (
            f"cost {self.cost:.2f} full-trial equivalents, {self.eval_seconds:.0f} s of evaluation"
        )

    def best(self, objective: str) -> int | None:
        """The trial number best on one objective (dev scores), ties to the earliest."""
        j = self.objectives.index(objective)
        scored = [m for m in self.members if m.record.vector_dev is not None]
        if not scored:
            return None
        sign = -1.0 if self.maximize[j] else 1.0

        def rank(m: Member) -> tuple[float, int]:
            vector = m.record.vector_dev
            assert vector is not None  # `scored` holds only members with one
            return (sign * vector[j], m.record.number)

        return min(scored, key=rank).record.number


def analyse(view: StudyView, split: str = "dev") -> FrontSummary:
    objectives = view.objectives
    maximize = view.maximize
    complete = view.complete
    greedy = view.greedy_soup
    dev_vectors = [r.vector_dev for r in complete if r.vector_dev is not None]
    mask = pareto.pareto_mask(dev_vectors, maximize) if dev_vectors else None
    front = [r for r, on in zip(complete, mask) if on] if mask is not None else []
    knee = None
    if front:
        knee = front[pareto.knee_index([r.vector_dev for r in front], maximize)].number  # type: ignore[misc]

    def values(r: TrialRecord) -> list[float] | None:
        return r.vector(objectives, split)

    def stderr(r: TrialRecord) -> list[float] | None:
        if split != "dev" or r.dev_stderr is None:
            return None
        return [float(r.dev_stderr.get(o.name, 0.0)) for o in objectives]

    members = [
        Member(
            r,
            values(r),
            baseline_name(r, greedy) or "search",
            is_knee=r.number == knee,
            stderr=stderr(r),
        )
        for r in front
    ]
    baselines = [
        Member(r, values(r), baseline_name(r, greedy) or "baseline", stderr=stderr(r))
        for r in complete
        if is_final_baseline(r, greedy)
    ]
    scored_baselines = [b for b in baselines if b.values is not None]
    for m in members:
        if m.values is None or not scored_baselines:
            continue
        hits = pareto.dominated_rows([m.values], [b.values for b in scored_baselines], maximize)[0]  # type: ignore[misc]
        m.dominates = [scored_baselines[i].label for i in hits]
    hv: float | None = None
    ref: list[float] | None = None
    if split == "dev":
        pool = [v for v in dev_vectors if v is not None]
        front_vals = [m.values for m in members if m.values is not None]
    else:
        front_vals = [m.values for m in members if m.values is not None]
        pool = front_vals + [b.values for b in scored_baselines if b.values is not None]
    if pool and front_vals:
        reference = pareto.nadir(pool, maximize)
        ref = [float(x) for x in reference]
        hv = pareto.hypervolume(front_vals, reference, maximize)
    return FrontSummary(
        split=split,
        objectives=[o.name for o in objectives],
        maximize=maximize,
        members=members,
        baselines=baselines,
        knee=knee,
        hypervolume=hv,
        reference=ref,
        n_complete=len(complete),
        n_failed=sum(1 for r in view.trials if r.state == "FAIL"),
        n_trials=len(view.trials),
        n_pruned=len(view.pruned),
        cost=cost_of(view)[0],
        eval_seconds=sum(r.eval_seconds or 0.0 for r in view.trials),
        n_estimated=sum(1 for r in complete if r.dev_stderr is not None),
    )


def format_score(value: float, stderr: float | None) -> str:
    """A score, with its standard error where it is an estimate: `0.55 ± 0.021`."""
    return format_number(value) if stderr is None else f"{format_number(value)} ± {stderr:.2g}"


def describe_strata(strata: Mapping[str, Any] | None) -> list[str]:
    """One line per task of a stratified study: its strata, or why it is scored in full."""
    if strata is None:
        return []
    lines = []
    for task, entry in sorted(strata["tasks"].items()):
        sizes = {name: len(ids) for name, ids in entry["docs"].items()}
        n = sum(sizes.values())
        parts = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        lines.append(
            f"{task}: stratified by {', '.join(entry['keys'])} over {n} dev documents "
            f"({parts}; agreed v: the checkpoints, or all but the dissenting ones, scored v); "
            "an estimated trial scores every contested one and a sample of the rest"
        )
    lines += [f"{task}: scored in full ({why})" for task, why in sorted(strata["full"].items())]
    return lines


def format_weights(weights: dict[str, Any], *, drop_zero: bool = True) -> str:
    """{a: 0.5, b: 0.5, c: 0} → 'a=0.5 b=0.5'; grouped weights → 'a=0.5/0.4/0.1 ...'.

    Three significant digits; weights below 0.0005 are left out (a single checkpoint reads
    as one name).
    """
    parts = []
    for name, w in weights.items():
        if isinstance(w, dict):
            values = [v for v in w.values() if isinstance(v, int | float)]
            if drop_zero and values and all(abs(v) < 0.0005 for v in values):
                continue
            parts.append(f"{name}=" + "/".join(format_value(v) for v in w.values()))
        else:
            if drop_zero and isinstance(w, int | float) and abs(w) < 0.0005:
                continue
            parts.append(f"{name}={format_value(w)}")
    return " ".join(parts) or "-"


def format_recipe(record: TrialRecord) -> str:
    """What a trial merged: its weights (where the method reads them), then each tuned
    value ('density=0.42', per group 't=0.3/0.7')."""
    tuned = format_weights(record.tuned, drop_zero=False) if record.tuned else ""
    weights = format_weights(record.weights) if record.weights else ""
    return " ".join(p for p in (weights, tuned) if p) or "-"


def format_value(value: Any) -> str:
    """A weight or tuned value at three significant digits (nearswap's t is ~1e-3)."""
    return f"{value:.3g}" if isinstance(value, int | float) else "n/a"


def format_number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/a"


def describe_doc_split(
    records: Mapping[str, Mapping[str, Any]] | None, dev: str = "dev"
) -> list[str]:
    """One line per task: which documents its dev and test scores use."""
    lines = []
    for task, r in sorted((records or {}).items()):
        if "splits" in r:
            dev_split, test_split = r["splits"][0], r["splits"][1]
            lines.append(
                f"{task}: {dev} = its split {dev_split!r}, test = its split {test_split!r}"
            )
        else:
            n, n_dev = r["docs"], r["dev_docs"]
            lines.append(
                f"{task}: {dev} = {n_dev} of the {n} documents of its {r['source']!r} split, "
                f"test = the other {n - n_dev} (seed {r['seed']}, fraction {r['fraction']}, "
                f"dev ids sha256 {r['dev_ids_sha256']})"
            )
    return lines
