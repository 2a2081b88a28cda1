"""A result cache keyed by the recipe with its numbers rounded.

Samplers repeat themselves (TPE near convergence, NSGA-II's elites, a baseline that
equals another: MWA with equal losses is the uniform soup, the greedy soup's first step
is a single checkpoint). A repeated proposal must cost nothing: the study's own
completed trials are the cache, so it survives a restart with no file of its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Weights closer than 5e-5 merge into models whose scores cannot be told apart.
DEFAULT_NDIGITS = 4


def _rounded(value: Any, ndigits: int) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        # + 0.0 turns -0.0 into 0.0 so both spell one key.
        return round(value, ndigits) + 0.0
    if isinstance(value, Mapping):
        return {str(k): _rounded(v, ndigits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v, ndigits) for v in value]
    return str(value)


def recipe_key(recipe: Mapping[str, Any], ndigits: int = DEFAULT_NDIGITS) -> str:
    """A canonical string for a recipe dict: equal for recipes equal after rounding."""
    return json.dumps(_rounded(recipe, ndigits), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class CachedResult:
    """What a finished evaluation left: the trial that paid for it and its scores."""

    trial_number: int
    metrics: dict[str, dict[str, float]]


class ResultCache:
    """(recipe key, split) → the first trial that evaluated it."""

    def __init__(self, ndigits: int = DEFAULT_NDIGITS) -> None:
        self.ndigits = ndigits
        self._entries: dict[tuple[str, str], CachedResult] = {}
        self.hits = 0

    def key(self, recipe: Mapping[str, Any]) -> str:
        return recipe_key(recipe, self.ndigits)

    def get(self, recipe: Mapping[str, Any], split: str) -> CachedResult | None:
        found = self._entries.get((self.key(recipe), split))
        if found is not None:
            self.hits += 1
        return found

    def put(self, recipe: Mapping[str, Any], split: str, result: CachedResult) -> None:
        # The first evaluation stays the reference: later copies point at it.
        self._entries.setdefault((self.key(recipe), split), result)

    def __len__(self) -> int:
        return len(self._entries)
