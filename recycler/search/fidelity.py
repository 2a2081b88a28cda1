"""Multi-fidelity trials: which documents each rung scores, and who goes on to the next.

A rung is a fraction of every task's dev documents (`search.fidelity.rungs`); its
documents are a seeded prefix of one fixed order of them (`docsplit.rung_ids`), so each
rung holds the one below, and every trial is ranked on the same documents. A trial
scores a rung's new documents only; its scores on a rung are lm-eval's over all that
rung's documents (`evaluate.doc_scores`).

Asynchronous successive halving (ASHA, Li et al. 2020), for several objectives: when a
trial finishes rung r it goes on to rung r+1 if it is among the best ⌊n/eta⌋ of the n
trials that have finished rung r so far, ranked by non-dominated sorting and, within a
front, by crowding distance (NSGA-II's order); otherwise it stops there. The decision
is taken once, when the trial finishes the rung: no trial waits for others (no
generation barrier) and none is resumed later.

A search without `search.fidelity` is the plan of one rung, 1.0: every trial scores
every dev document at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recycler.errors import RecyclerError
from recycler.evaluate.docsplit import rung_ids
from recycler.evaluate.results import IDS, DocScores
from recycler.search.front import dominates
from recycler.search_spec import FidelitySpec

FULL = (1.0,)
# The fewest documents of a task a rung scores: below ten, a task's accuracy moves in steps
# over 0.1, so trials tie or are ranked by noise (rungs [0.11, 0.33, 1] left 4 documents
# per task on the micro pool, and every search trial was pruned at the first rung).
MIN_RUNG_DOCS = 10


@dataclass(frozen=True)
class RungPlan:
    """The rungs of a study: each one's documents per task, and eta."""

    fractions: tuple[float, ...]
    eta: float
    docs: tuple[dict[str, list[int]], ...]  # per rung: task → its documents (sorted)

    # Notes on rungs raised to MIN_RUNG_DOCS documents of a task (printed by the search).
    notes: tuple[str, ...] = ()

    @classmethod
    def build(
        cls, dev_ids: Mapping[str, Sequence[int]], fidelity: FidelitySpec | None, seed: int
    ) -> RungPlan:
        """The plan for these dev documents. A rung that leaves a task fewer than
        MIN_RUNG_DOCS documents scores that many of it (a note says so); RecyclerError
        naming search.fidelity.rungs where a rung then scores no more documents of a task
        than the rung below."""
        fractions = FULL if fidelity is None else tuple(fidelity.rungs)
        per_task: dict[str, list[list[int]]] = {}
        short: dict[int, list[str]] = {}
        for task, ids in sorted(dev_ids.items()):
            floor = min(MIN_RUNG_DOCS, len(ids)) / max(1, len(ids))
            for k, f in enumerate(fractions):
                if f < floor:
                    given = round(len(ids) * f)
                    short.setdefault(k, []).append(f"{task} {given} of its {len(ids)}")
            # The same seeded order, a longer prefix: the rungs stay nested.
            per_task[task] = rung_ids(ids, [max(f, floor) for f in fractions], seed)
        for task, rungs in per_task.items():
            for k in range(1, len(rungs)):
                if len(rungs[k]) == len(rungs[k - 1]):
                    raise RecyclerError(
                        f"search.fidelity.rungs: rungs {fractions[k - 1]} and {fractions[k]} "
                        f"give task {task} the same {len(rungs[k])} documents "
                        f"({len(dev_ids[task])} dev documents"
                        + (f", at least {MIN_RUNG_DOCS} per rung)" if k - 1 in short else ")")
                    )
        notes = tuple(
            f"search.fidelity.rungs: rung {fractions[k]} leaves too few documents to rank "
            f"trials ({', '.join(tasks)} dev documents); it scores {MIN_RUNG_DOCS} of each "
            "such task (all where it has fewer)"
            for k, tasks in sorted(short.items())
        )
        return cls(
            fractions=fractions,
            eta=1.0 if fidelity is None else float(fidelity.eta),
            docs=tuple(
                {task: rungs[k] for task, rungs in per_task.items()} for k in range(len(fractions))
            ),
            notes=notes,
        )

    @property
    def multi(self) -> bool:
        """More than one rung: trials are scored a rung at a time."""
        return len(self.fractions) > 1

    @property
    def last(self) -> int:
        return len(self.fractions) - 1

    @property
    def full_docs(self) -> int:
        """The documents of a full-fidelity trial: the unit of `search.budget`."""
        return self.n_docs(self.last)

    def n_docs(self, rung: int) -> int:
        return sum(len(ids) for ids in self.docs[rung].values())

    def missing(self, scores: DocScores, rung: int) -> dict[str, list[int]]:
        """The documents of `rung` that `scores` does not hold yet, per task."""
        out: dict[str, list[int]] = {}
        for task, ids in self.docs[rung].items():
            have = set(scores[task][IDS]) if task in scores else set()
            out[task] = [i for i in ids if i not in have]
        return out

    def reached(self, scores: DocScores) -> int | None:
        """The highest rung whose documents `scores` holds all of; None when not even the
        first one's."""
        done = None
        for rung in range(len(self.fractions)):
            if any(self.missing(scores, rung).values()):
                break
            done = rung
        return done

    def record(self) -> dict[str, Any] | None:
        """What a resumed study must share (part of its fingerprint); None for one rung."""
        if not self.multi:
            return None
        return {
            "rungs": list(self.fractions),
            "eta": self.eta,
            "docs": [self.n_docs(k) for k in range(len(self.fractions))],
        }


def promotion_order(values: Mapping[int, Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Trial numbers best first: by non-dominated front, then by crowding distance within
    it (largest first: the ends and the sparse parts of a front), then by trial number."""
    left = dict(values)
    order: list[int] = []
    while left:
        front = [
            n
            for n, v in left.items()
            if not any(dominates(w, v, maximize) for m, w in left.items() if m != n)
        ]
        crowding = _crowding({n: left[n] for n in front})
        order.extend(sorted(front, key=lambda n: (-crowding[n], n)))
        for n in front:
            del left[n]
    return order


def _crowding(front: Mapping[int, Sequence[float]]) -> dict[int, float]:
    """NSGA-II's crowding distance of each member of one front."""
    distance = dict.fromkeys(front, 0.0)
    if len(front) <= 2:
        return dict.fromkeys(front, math.inf)
    n_objectives = len(next(iter(front.values())))
    for j in range(n_objectives):
        ranked = sorted(front, key=lambda n: (front[n][j], n))
        low, high = front[ranked[0]][j], front[ranked[-1]][j]
        distance[ranked[0]] = distance[ranked[-1]] = math.inf
        if high == low:
            continue
        for before, member, after in zip(ranked, ranked[1:], ranked[2:], strict=False):
            distance[member] += (front[after][j] - front[before][j]) / (high - low)
    return distance


def promotes(
    candidate: int, values: Mapping[int, Sequence[float]], maximize: Sequence[bool], eta: float
) -> bool:
    """ASHA's rule: `candidate` is among the best ⌊n/eta⌋ of the n trials that finished the
    rung (`values`, the candidate's own included).

    While fewer than eta trials have finished the rung, ⌊n/eta⌋ is 0 and no trial would
    ever go on; then the best so far goes on (Optuna's SuccessiveHalvingPruner does the
    same), so a search's first trial reaches full fidelity at once.
    """
    keep = max(1, math.floor(len(values) / eta))
    return candidate in promotion_order(values, maximize)[:keep]
