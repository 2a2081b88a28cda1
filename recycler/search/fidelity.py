"""Multi-fidelity trials: which documents each rung scores, and who goes on to the next.

A rung is a fraction of every task's dev documents (`search.fidelity.rungs`); its
documents are a seeded prefix of one fixed order of them (`docsplit.rung_ids`), so each
rung holds the one below, and every trial is ranked on the same documents. A trial
scores a rung's new documents only; its scores on a rung are lm-eval's over all that
rung's documents (`evaluate.doc_scores`).

Asynchronous successive halving (ASHA, Li et al. 2020), for several objectives: when a
trial finishes rung r it goes on to rung r+1 if it is among the best ⌊n/eta⌋ of the n
trials that have finished rung r so far, ranked by non-dominated sorting and, within a
front, by exclusive hypervolume contribution (SMS-EMOA's order), ties by a seeded draw;
otherwise it stops there. The decision is taken once, when the trial finishes the rung:
no trial waits for others (no generation barrier) and none is resumed later.

Not crowding distance, NSGA-II's order within a front: with several objectives most of a
rung's trials are on the first front and most of those are the best or worst of it in
some objective, so most distances are infinite and ties went by trial number; the
baselines and the first trials always won, and on the micro pool (five objectives) every
search trial was pruned at the first rung.

A search without `search.fidelity` is the plan of one rung, 1.0: every trial scores
every dev document at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recycler.errors import RecyclerError
from recycler.evaluate.docsplit import rung_ids
from recycler.evaluate.results import IDS, DocScores
from recycler.search.front import estimated_contributions, hypervolume_contributions
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


# The hypervolume's reference point: the rung's nadir, moved out by this fraction of each
# objective's range there, so a trial that is the worst of the rung in one objective still
# has a contribution of its own (with the nadir itself, it would have none).
REFERENCE_MARGIN = 0.1
# Exact contributions cost about (trials on the front)^(objectives - 1) steps: about 0.2 s
# at this many (66 trials in five objectives); above it they are estimated
# (`front.estimated_contributions`, seeded), which stays under a second for hundreds.
EXACT_COST_LIMIT = 2e7


class _RungRanking:
    """The trials that finished one rung, ranked as ASHA's rule needs them.

    Values are turned into minimisation and scaled by each objective's range over the
    rung (a constant objective scales by 1), so objectives of other units weigh alike and
    the reference point is (1 + REFERENCE_MARGIN, ...).
    """

    def __init__(
        self, values: Mapping[int, Sequence[float]], maximize: Sequence[bool], seed: int
    ) -> None:
        self.numbers = sorted(values)
        signs = np.where(np.asarray(maximize, dtype=bool), -1.0, 1.0)
        y = np.asarray([values[n] for n in self.numbers], dtype=np.float64) * signs
        low, high = y.min(axis=0), y.max(axis=0)
        self.scaled = (y - low) / np.where(high > low, high - low, 1.0)
        self.seed = seed

    def fronts(self) -> Iterator[list[int]]:
        """Non-dominated sorting: the first front, then the front of what is left, ..."""
        row, column = self.scaled[:, None, :], self.scaled[None, :, :]
        beats = np.all(row <= column, axis=2) & np.any(row < column, axis=2)  # row beats column
        left = np.ones(len(self.numbers), dtype=bool)
        while left.any():
            front = left & ~beats[left].any(axis=0)
            yield [self.numbers[i] for i in np.flatnonzero(front)]
            left &= ~front

    def within(self, front: Sequence[int]) -> list[int]:
        """One front's trials best first: the largest exclusive hypervolume contribution
        first (SMS-EMOA's order: what the front would lose without the trial), trials of
        equal values sharing their point's contribution; ties by `tie_key`, never by age."""
        rows = self.scaled[[self.numbers.index(n) for n in front]]
        points, point_of = np.unique(rows, axis=0, return_inverse=True)
        n_objectives = points.shape[1]
        reference, minimize = [1.0 + REFERENCE_MARGIN] * n_objectives, [False] * n_objectives
        if float(len(points)) ** (n_objectives - 1) <= EXACT_COST_LIMIT:
            contribution = hypervolume_contributions(points, reference, minimize)
        else:
            contribution = estimated_contributions(points, reference, minimize, self.seed)
        # Rounded, so that values equal but for floating-point noise tie.
        key = {n: -round(float(contribution[p]), 12) for n, p in zip(front, point_of.ravel())}
        return sorted(front, key=lambda n: (key[n], tie_key(n, self.seed)))


def tie_key(number: int, seed: int) -> float:
    """A seeded draw per trial that orders trials of equal rank: not their age (the trial
    number), which would favour the baselines and the first trials forever."""
    return random.Random(f"{seed}:{number}").random()


def promotion_order(
    values: Mapping[int, Sequence[float]], maximize: Sequence[bool], seed: int = 0
) -> list[int]:
    """Trial numbers best first: by non-dominated front, then, within a front, by
    exclusive hypervolume contribution (`_RungRanking.within`)."""
    ranking = _RungRanking(values, maximize, seed)
    return [n for front in ranking.fronts() for n in ranking.within(front)]


def promotes(
    candidate: int,
    values: Mapping[int, Sequence[float]],
    maximize: Sequence[bool],
    eta: float,
    seed: int = 0,
) -> bool:
    """ASHA's rule: `candidate` is among the best ⌊n/eta⌋ of the n trials that finished the
    rung (`values`, the candidate's own included), in `promotion_order`.

    While fewer than eta trials have finished the rung, ⌊n/eta⌋ is 0 and no trial would
    ever go on; then the best so far goes on (Optuna's SuccessiveHalvingPruner does the
    same), so a search's first trial reaches full fidelity at once. Only the fronts up to
    the candidate's are ranked within (the contributions cost the most).
    """
    keep = max(1, math.floor(len(values) / eta))
    ranking = _RungRanking(values, maximize, seed)
    ahead = 0
    for front in ranking.fronts():
        if candidate in front:
            return ahead + ranking.within(front).index(candidate) < keep
        ahead += len(front)
        if ahead >= keep:
            return False
    raise ValueError(f"trial {candidate} has no values on the rung")
