"""When failing trials stop a search.

A failed trial counts toward no budget (`budget.counts_toward_budget`, `budget.trial_cost`):
a study whose evaluations fail is fixed and run again on the budget it had. So that a
study failing every evaluation neither runs forever nor hides its cause in a trial
list, the driver stops with one error naming the cause when

- the study has no result yet and its first trials failed alike (`FIRST_FAILURES` in a
  row, the same reason), or
- `FAILURES_LIMIT` trials in a row failed, whatever the reasons.
"""

from __future__ import annotations

import re

import optuna
from optuna.trial import TrialState

from recycler.errors import RecyclerError

FIRST_FAILURES = 3
FAILURES_LIMIT = 20
# A reason that names its trial ("trial 7: ...") is the same reason for every trial.
_TRIAL_PREFIX = re.compile(r"^trial \d+: ")


class FailureStreak:
    """The reasons of the trials one driver told failed since its last trial with a result."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def failed(self, reason: str) -> None:
        lines = reason.strip().splitlines()
        self.reasons.append(_TRIAL_PREFIX.sub("", lines[0] if lines else "no reason given"))

    def succeeded(self) -> None:
        self.reasons.clear()

    def stop_error(self, study: optuna.Study) -> RecyclerError | None:
        """The error that stops the search, or None while it may go on."""
        n = len(self.reasons)
        if n >= FAILURES_LIMIT:
            return RecyclerError(
                f"search: the last {n} trials all failed, so the search stopped (failed trials "
                f"are not counted); the last one: {self.reasons[-1]}"
            )
        if n < FIRST_FAILURES or len(set(self.reasons[-FIRST_FAILURES:])) > 1:
            return None
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            return None
        return RecyclerError(
            f"search: stopped after its first {n} trials all failed the same way (failed "
            f"trials are not counted: fix the study and run it again): {self.reasons[-1]}"
        )
