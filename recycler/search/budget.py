"""A search's budget: `n_trials` counted trials, or `search.budget` full-trial equivalents
of documents scored. The budget is the study's, whichever processes run its trials:
what counts and what is held is read from the storage each time (`budget_held`,
`n_counted`, `cost_of`)."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from recycler.config import StudySpec
from recycler.search.baselines import GREEDY
from recycler.search.stored import StudyView, TrialRecord, view_of
from recycler.search.study import StudyHandle

# ---- the budget: n_trials is the study's, whichever processes run its trials -------------
#
# Several processes may drive one study. Each takes a trial (study.ask: a new RUNNING
# trial, or a queued one set RUNNING) and only then counts the trials that hold budget:
# the finished ones that count and every RUNNING one, its own included. Over n_trials,
# it puts its trial back in the queue and starts nothing. This cannot overshoot: suppose
# more than n_trials trials were kept. Take the kept trial whose count was read last. Every
# other kept trial turned RUNNING (a committed write: trial creation locks the study row,
# a queued trial's RUNNING update is a compare-and-set) before its own count, so before
# this last count, which (read committed, or SQLite's single writer) saw them all, plus
# itself: more than n_trials, so it was put back, not kept. A contradiction. The converse
# (two processes both seeing the other and both putting back) leaves budget unspent for a
# moment; the driver then tries again after a random pause.


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Trials with a result count toward n_trials: complete and pruned ones. A failed trial
    does not: a study whose evaluations fail is fixed and run again on the budget it had
    (`requeue_failed_baselines`), and a stale or duplicate one stands for no result."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def holds_budget(trial: FrozenTrial) -> bool:
    """A trial spending one of n_trials: reserved while RUNNING, counted once finished."""
    return trial.state == TrialState.RUNNING or counts_toward_budget(trial)


def budget_held(study: optuna.Study) -> int:
    """How many of the study's trials hold budget now (read fresh from the storage)."""
    return sum(holds_budget(t) for t in study.get_trials(deepcopy=False))


def n_counted(study: optuna.Study) -> int:
    """How many finished trials count toward n_trials."""
    return sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


# ---- the budget in full-trial equivalents (search.budget) ----------------------------------
#
# The cost of a trial is the documents its own evaluations scored over those of a full
# trial (a cache hit and a failed trial cost nothing; a re-run does not pay again for the
# rungs it carries). A RUNNING trial also holds the documents of the evaluation it runs now, so
# that drivers sharing a study do not all start one on the last of the budget. Unlike
# n_trials this can overshoot: trials between rungs when it is reached still go on to
# the rungs they won (at most about one full trial per evaluation worker).


def trial_cost(record: TrialRecord, full_docs: int | None) -> tuple[float, float]:
    """(spent, held) by one trial, in full-trial equivalents (`full_docs`: the documents of
    a full trial; None for a study made before documents were counted).

    A failed trial costs nothing, like it counts toward no n_trials; a stale one still
    pays for the rungs it finished (its re-run carries them without paying again)."""
    if record.state == "FAIL" and not record.stale:
        return 0.0, 0.0
    if record.docs_scored is None or full_docs is None:  # a trial scored every document
        evaluated = record.cache_hit is None and record.eval_seconds is not None
        spent = 1.0 if evaluated else 0.0
    else:
        spent = record.docs_scored / full_docs
    held = record.docs_in_flight / full_docs if record.state == "RUNNING" and full_docs else 0.0
    return spent, spent + held


def cost_of(view: StudyView) -> tuple[float, float]:
    """(spent, held) by the whole study, in full-trial equivalents."""
    spent = held = 0.0
    for record in view.trials:
        s, h = trial_cost(record, view.dev_docs)
        spent, held = spent + s, held + h
    return spent, held


def put_back(handle: StudyHandle, number: int) -> None:
    """Return a trial this process has just taken, before it suggested anything, to the queue."""
    storage = handle.storage
    study_id = storage.get_study_id_from_name(handle.study.study_name)
    storage.set_trial_state_values(
        storage.get_trial_id_from_study_id_trial_number(study_id, number), TrialState.WAITING
    )


@dataclass(frozen=True)
class Budget:
    """Where a search stops: at `n_trials` counted trials, or once `cost` full-trial
    equivalents of documents are spent (`search.budget`)."""

    n_trials: int | None = None
    cost: float | None = None

    @classmethod
    def of(cls, spec: StudySpec, n_trials: int | None = None) -> Budget:
        """The study file's budget; `n_trials` (the command line's) replaces it."""
        if n_trials is not None:
            return cls(n_trials=n_trials)
        if spec.search.budget is not None:
            return cls(cost=spec.search.budget)
        return cls(n_trials=spec.search.n_trials)

    def spent(self, study: optuna.Study) -> bool:
        """The study has spent it (finished trials only)."""
        if self.cost is not None:
            return cost_of(view_of(study))[0] >= self.cost
        assert self.n_trials is not None
        return n_counted(study) >= self.n_trials

    def held(self, study: optuna.Study, *, taken: bool) -> bool:
        """It is all held by finished and running trials. `taken`: counted after taking a
        trial, which holds one of n_trials already (a cost budget counts the documents of
        evaluations in flight, which a trial just taken has none of yet)."""
        if self.cost is not None:
            return cost_of(view_of(study))[1] >= self.cost
        assert self.n_trials is not None
        held = budget_held(study)
        return held > self.n_trials if taken else held >= self.n_trials

    def baselines_note(self, study: optuna.Study) -> str | None:
        """A note when the budget holds no trial beyond the study's baselines: then the
        sampler proposes nothing, and a user should know before the search starts."""
        if self.n_trials is None:
            return None
        labels = {r.baseline for r in view_of(study).trials if r.baseline not in (None, GREEDY)}
        if self.n_trials > len(labels):
            return None
        return (
            f"search.n_trials: {self.n_trials} trial(s), no more than the study's "
            f"{len(labels)} baselines: only baselines are scored, no trial is searched "
            f"(set n_trials above {len(labels)} to search)"
        )
