"""A search's budget: `n_trials` counted trials, or `search.budget` full-trial equivalents
of documents scored. The budget is the study's, whichever processes run its trials:
what counts and what is held is read from the storage (study.py: `budget_held`,
`n_counted`, `cost_of`)."""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from recycler.config import StudySpec
from recycler.search.stored import view_of
from recycler.search.study import budget_held, cost_of, n_counted


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
