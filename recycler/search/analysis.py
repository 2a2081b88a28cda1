"""A stored study, summarised: its Pareto set, knee, baselines, hypervolume, on dev or test.

The Pareto set is always chosen on the dev split (what the search optimised); `split`
only says which scores are shown and compared: on test, the same members' held-out
scores against the baselines' held-out scores. The hypervolume's reference point is the
worst value of each objective over the trials scored on that split, so the number is
comparable between trials of one study, not between studies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recycler.search import front as pareto
from recycler.search.baselines import baseline_name, is_final_baseline
from recycler.search.study import StudyView, TrialRecord


@dataclass
class Member:
    record: TrialRecord
    values: list[float] | None  # on the chosen split; None when not scored on it
    label: str  # baseline name, or "search"
    dominates: list[str] = field(default_factory=list)
    is_knee: bool = False


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

    def best(self, objective: str) -> int | None:
        """The trial number best on one objective (dev scores), ties to the earliest."""
        j = self.objectives.index(objective)
        scored = [m for m in self.members if m.record.vector_dev is not None]
        if not scored:
            return None
        sign = -1.0 if self.maximize[j] else 1.0
        return min(
            scored, key=lambda m: (sign * m.record.vector_dev[j], m.record.number)
        ).record.number  # type: ignore[index]


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

    members = [
        Member(r, values(r), baseline_name(r, greedy) or "search", is_knee=r.number == knee)
        for r in front
    ]
    baselines = [
        Member(r, values(r), baseline_name(r, greedy) or "baseline")
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
    )
