"""Baseline trials, enqueued first so they live in the study and on the dashboard.

- `uniform`: w_i = 1/n (the uniform soup); for a method that reads no weights, `defaults`:
  its tuned parameters at their defaults (the middle of a range where none).
- `singles`: each checkpoint alone (one-hot weights); for a method that reads no weights,
  the values at which it gives each input back (slerp: t = 0 is the base or first model,
  t = 1 the other), where it has such values.
- A baseline that is the same merge as an earlier one (one checkpoint: uniform = its single;
  equal losses: MWA = uniform) is skipped with a note.
- `mwa_loss`, `mwa_step`: metric-weighted averaging from trainer_state.json
  (w_i ∝ (1/loss_i)^p or step_i^p, recycler.merge.weights), with p = 0.65 for loss and
  p = 1.0 for steps: the middle of the ranges Yu & Choi report as best.
- `greedy`: the greedy soup (Wortsman et al. 2022): checkpoints sorted by their single
  score (the macro-average of the objectives), each added to the soup only if the soup's
  score does not drop. Its steps depend on scores, so they are enqueued one at a time as
  the scores arrive; the state is recomputed from the stored trials, so a resumed search
  picks up where the killed one stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.merge.methods import METHODS
from recycler.merge.weights import mwa_weights, uniform_weights
from recycler.search.cache import recipe_key
from recycler.search.space import SearchSpace
from recycler.search.stored import (
    Objective,
    TrialRecord,
    greedy_soup_settled,
    queued_attrs,
    settle_greedy_soup,
    view_of,
)
from recycler.search.study import enqueue, macro_average

MWA_PENALTY = {"loss": 0.65, "step": 1.0}
SINGLE = "single:"
GREEDY = "greedy"
# The baselines of a method that reads no weights: its defaults, and the base as an endpoint.
DEFAULTS = "defaults"
BASE = "base"


def is_checkpoint_baseline(label: str) -> bool:
    """A baseline that is one checkpoint of the pool as it is (or the base)."""
    return label.startswith(SINGLE) or label == BASE


@dataclass(frozen=True)
class Baseline:
    label: str
    weights: list[float] | None  # None: the method reads no weights
    tuned: dict[str, float] = field(default_factory=dict)  # the rest take their default


def fixed_baselines(
    space: SearchSpace, checkpoints: Sequence[Any], wanted: Sequence[str]
) -> tuple[list[Baseline], list[str]]:
    """The baselines whose values are known before any score: (baselines, notes on skipped
    ones). Each is a merge the method makes: weights where it reads them; otherwise its
    tuned values at their defaults (`defaults`) and, as `singles`, the values at which it
    gives its inputs back (`MethodDescription.endpoints`: slerp's t = 0 and 1).

    `checkpoints` are recycler.pool Checkpoints (for trainer_state.json), in pool order.
    """
    if not space.weighted:
        return _unweighted_baselines(space, wanted)
    names = space.names
    n = len(names)
    out: list[Baseline] = []
    notes: list[str] = []
    for label in wanted:
        if label == "uniform":
            out.append(Baseline("uniform", uniform_weights(n)))
        elif label == "singles":
            out.extend(
                Baseline(f"{SINGLE}{name}", [1.0 if j == i else 0.0 for j in range(n)])
                for i, name in enumerate(names)
            )
        elif label in ("mwa_loss", "mwa_step"):
            metric: Literal["loss", "step"] = "loss" if label == "mwa_loss" else "step"
            try:
                out.append(Baseline(label, mwa_weights(checkpoints, metric, MWA_PENALTY[metric])))
            except RecyclerError as exc:
                notes.append(f"baseline {label} skipped: {exc}")
    return out, notes


def _unweighted_baselines(
    space: SearchSpace, wanted: Sequence[str]
) -> tuple[list[Baseline], list[str]]:
    method = space.method
    out: list[Baseline] = []
    notes: list[str] = []
    for label in wanted:
        if label == "uniform":
            out.append(Baseline(DEFAULTS, None))
        elif label == "singles" and method.endpoints is not None:
            ends = method.endpoints
            first = BASE if space.base_path is not None else f"{SINGLE}{space.names[0]}"
            out.append(Baseline(first, None, {ends.param: ends.first}))
            out.append(Baseline(f"{SINGLE}{space.names[-1]}", None, {ends.param: ends.last}))
        elif label == "singles":
            notes.append(f"baseline singles skipped: {method.name} never gives one input back")
        else:
            notes.append(f"baseline {label} skipped: {method.name} reads no weights")
    if DEFAULTS in [b.label for b in out]:
        notes.append(
            f"baseline uniform is {DEFAULTS} for {method.name} (it reads no weights): "
            "every tuned parameter at its default, or the middle of its range"
        )
    return out, notes


def baseline_trials(
    space: SearchSpace, checkpoints: Sequence[Any], wanted: Sequence[str]
) -> tuple[list[tuple[str, dict[str, float]]], list[str]]:
    """(label, trial parameters) of each fixed baseline inside the space, none of them the
    same merge as an earlier one (the result cache's test); notes on those skipped."""
    baselines, notes = fixed_baselines(space, checkpoints, wanted)
    out: list[tuple[str, dict[str, float]]] = []
    seen: dict[str, str] = {}
    for b in baselines:
        params = space.encode(b.weights, b.tuned)
        if params is None:
            notes.append(f"baseline {b.label} skipped: its values are outside the search space")
            continue
        key = recipe_key(space.recipe_dict(space.decode(params)))
        if key in seen:
            notes.append(f"baseline {b.label} skipped: the same merge as {seen[key]}")
            continue
        seen[key] = b.label
        out.append((b.label, params))
    return out, notes


def is_final_baseline(record: TrialRecord, greedy_soup: int | None) -> bool:
    """Baselines a front is compared with: every seeded trial but the greedy soup's trial steps."""
    if record.number == greedy_soup:
        return True
    return record.baseline is not None and record.baseline != GREEDY


def baseline_name(record: TrialRecord, greedy_soup: int | None) -> str | None:
    if record.number == greedy_soup:
        return (
            "greedy_soup"
            if record.baseline in (None, GREEDY)
            else f"{record.baseline} (= greedy_soup)"
        )
    if record.baseline == GREEDY:
        return None
    return record.baseline


@dataclass
class GreedyState:
    """Where the greedy soup stands. `next_members` is the next soup to evaluate."""

    done: bool
    blocked: bool = False
    next_members: list[str] | None = None
    soup_trial: int | None = None


def greedy_state(
    records: Sequence[TrialRecord], names: Sequence[str], objectives: Sequence[Objective]
) -> GreedyState:
    """Replay the greedy soup over the stored trials."""
    singles: dict[str, TrialRecord] = {}
    for r in records:
        if r.baseline and r.baseline.startswith(SINGLE):
            name = r.baseline[len(SINGLE) :]
            if not _rerun(r):
                singles[name] = r
    scored: list[tuple[float, int, str, int]] = []
    for i, name in enumerate(names):
        single = singles.get(name)
        if single is None or single.state in ("WAITING", "RUNNING"):
            return GreedyState(done=False, blocked=True)
        if single.state == "COMPLETE" and single.vector_dev is not None:
            scored.append((macro_average(single.objectives, objectives), i, name, single.number))
    if not scored:
        # Every single failed: no soup yet. Left unsettled, so that the start that runs
        # them again (`study.requeue_failed_baselines`) builds it.
        return GreedyState(done=False, blocked=True)
    scored.sort(key=lambda s: (-s[0], s[1]))
    steps: dict[frozenset[str], TrialRecord] = {}
    for r in records:
        members = r.user_members
        if r.baseline == GREEDY and members is not None and not _rerun(r):
            steps[frozenset(members)] = r
    best_score, _, first, soup_trial = scored[0]
    soup = [first]
    for _, _, name, _ in scored[1:]:
        candidate = [n for n in names if n in soup or n == name]
        step = steps.get(frozenset(candidate))
        if step is None:
            return GreedyState(done=False, next_members=candidate)
        if step.state in ("WAITING", "RUNNING"):
            return GreedyState(done=False, blocked=True)
        if step.state == "COMPLETE" and step.vector_dev is not None:
            score = macro_average(step.objectives, objectives)
            if score >= best_score:
                best_score, soup, soup_trial = score, candidate, step.number
    return GreedyState(done=True, soup_trial=soup_trial)


def _rerun(r: TrialRecord) -> bool:
    """A trial failed because its process went away (its re-run, a later trial, counts
    instead) or dropped as a duplicate of an earlier one (that one counts)."""
    return r.state == "FAIL" and (
        r.duplicate_of is not None or (r.fail_reason or "").startswith(("stale", "interrupted"))
    )


def members_weights(names: Sequence[str], members: Sequence[str]) -> list[float]:
    """The uniform soup of `members`, as weights over all checkpoints."""
    share = 1.0 / len(members)
    return [share if n in members else 0.0 for n in names]


# ---- the greedy soup's steps, enqueued as the scores arrive --------------------------------


def greedy_pending(spec: StudySpec, study: optuna.Study) -> bool:
    """The study asks for the greedy soup (a soup of weights: only where the method reads
    them) and has not settled it yet."""
    return (
        "greedy" in spec.search.baselines
        and METHODS[spec.merge.method].weighted
        and not greedy_soup_settled(study.user_attrs)
    )


def enqueue_greedy_step(
    study: optuna.Study, spec: StudySpec, space: SearchSpace, objectives: Sequence[Objective]
) -> None:
    """Enqueue the greedy soup's next step once the scores it depends on are in and
    nothing else waits; settle the soup when every step has a score."""
    if not greedy_pending(spec, study):
        return
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return
    state = greedy_state(view_of(study).trials, space.names, objectives)
    if state.done:
        settle_greedy_soup(study, state.soup_trial)
        return
    if state.blocked or state.next_members is None:
        return
    params = space.encode(members_weights(space.names, state.next_members))
    if params is None:
        settle_greedy_soup(study, None)
        return
    enqueue(study, params, queued_attrs(params, baseline=GREEDY, greedy_members=state.next_members))


def settle_greedy(
    study: optuna.Study, spec: StudySpec, names: Sequence[str], objectives: Sequence[Objective]
) -> None:
    """Record the greedy soup's trial once every step has a score."""
    if not greedy_pending(spec, study):
        return
    state = greedy_state(view_of(study).trials, names, objectives)
    if state.done:
        settle_greedy_soup(study, state.soup_trial)
