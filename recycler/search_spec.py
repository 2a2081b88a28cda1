"""The study file's `search:` section: the search space's shape, the parameters it tunes,
the sampler, the objective, the budget, multi-fidelity rungs and the baselines."""

from __future__ import annotations

import itertools
import re
from typing import Any, Literal

from pydantic import Field, field_serializer, field_validator, model_validator

from recycler.samplers import SAMPLERS
from recycler.study_keys import KeyedError, StrictModel, matching, note_once

BaselineName = Literal["uniform", "singles", "mwa", "mwa_loss", "mwa_step", "greedy"]
# The uniform soup and every single checkpoint: n + 1 evaluations that let `front` say
# which baselines the search beats. Not by default (experiments 1 and 2): MWA, which did
# not beat the uniform soup, and the greedy soup, n - 1 more evaluations that every
# search of the same budget beat.
DEFAULT_BASELINES: tuple[BaselineName, ...] = ("uniform", "singles")
# Keys renamed since a release: old name -> new name, both read, the old with a note.
_RENAMED_SEARCH_KEYS = {"seeds": "baselines"}

_GRANULARITY = re.compile(r"^(model|blocks|layers:([1-9][0-9]*))$")


class TuneSpec(StrictModel):
    """One searched method parameter and its range."""

    name: str
    low: float
    high: float


class FidelitySpec(StrictModel):
    """Multi-fidelity trials (`recycler.search.fidelity`): a trial scores a rung's share of
    every task's dev documents, and goes on to the next rung only when it is among the
    best 1/eta of the trials that finished the rung."""

    rungs: list[float]
    eta: float = Field(default=3, ge=2)

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, value: list[float]) -> list[float]:
        if len(value) < 2:
            raise ValueError(
                "needs at least two rungs (one rung of 1.0 is a full-fidelity search: leave "
                "search.fidelity out)"
            )
        for low, high in itertools.pairwise(value):
            if not low < high:
                raise ValueError(f"must be increasing, got {low} before {high}")
        if value[0] <= 0:
            raise ValueError(f"a rung is a fraction of the dev documents in (0, 1], got {value[0]}")
        if value[-1] != 1.0:
            raise ValueError(f"the last rung must be 1.0 (every dev document), got {value[-1]}")
        return value


class SearchSpec(StrictModel):
    weights: Literal["simplex", "box"] = "simplex"
    bounds: tuple[float, float] = (0.0, 1.0)
    granularity: str = "model"
    tune: list[TuneSpec] = Field(default_factory=list)
    # A name in recycler.samplers.SAMPLERS.
    sampler: str = "tpe"
    # pareto: one Optuna value per objective, the search keeps a Pareto set;
    # macro_average: one value, the signed mean of the objectives (the setting of
    # Khalifa et al. 2024). Left out: macro_average for a sampler of one objective (cmaes),
    # else pareto.
    objective: Literal["pareto", "macro_average"] | None = None
    n_trials: int = Field(default=50, ge=1)
    # The search's budget in full-trial equivalents (documents scored / a full trial's),
    # instead of n_trials: what a multi-fidelity search is measured in.
    budget: float | None = Field(default=None, gt=0)
    fidelity: FidelitySpec | None = None
    seed: int = 0
    baselines: list[BaselineName] = Field(default_factory=lambda: list(DEFAULT_BASELINES))

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for old, new in _RENAMED_SEARCH_KEYS.items():
            if old not in data:
                continue
            if new in data:
                raise KeyedError(
                    f"search.{old}", f"renamed to search.{new}, which is also given: keep one"
                )
            note_once(
                f"search.{old} is now called search.{new}; the study file still reads as before"
            )
            data = {(new if k == old else k): v for k, v in data.items()}
        return data

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"must be one of {', '.join(SAMPLERS)}")
        return value

    @model_validator(mode="after")
    def _objective(self) -> SearchSpec:
        if self.objective == "pareto" and not SAMPLERS[self.sampler].multi_objective:
            raise KeyedError(
                "search.objective",
                f"{self.sampler} optimises one value: use macro_average or leave it out",
            )
        return self

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, value: str) -> str:
        return matching(
            _GRANULARITY, value, "must be model, blocks or layers:K with K a positive integer"
        )

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not low < high:
            raise ValueError(f"must be [low, high] with low < high, got [{low}, {high}]")
        return value

    @field_validator("tune", mode="before")
    @classmethod
    def _tune(cls, value: Any) -> Any:
        # `tune: [density, {lambda: [0.5, 2.0]}]`: a bare name takes merge.method's default
        # range (StudySpec._tune_ranges has put it in before this runs).
        if not isinstance(value, list):
            return value
        out: list[Any] = []
        for item in value:
            if isinstance(item, str):
                # Only where merge.method is unknown (its own error says so).
                raise ValueError(f"unknown parameter {item!r}")
            elif isinstance(item, dict) and len(item) == 1:
                # Whether merge.method can tune it: StudySpec._check_method, which knows it.
                ((name, rng),) = item.items()
                if not (
                    isinstance(rng, list | tuple)
                    and len(rng) == 2
                    and all(isinstance(v, int | float) and not isinstance(v, bool) for v in rng)
                ):
                    raise ValueError(f"{name}: range must be [low, high]")
                if not rng[0] < rng[1]:
                    raise ValueError(f"{name}: range must have low < high, got {list(rng)}")
                out.append({"name": name, "low": float(rng[0]), "high": float(rng[1])})
            else:
                raise ValueError("each entry must be a parameter name or {name: [low, high]}")
        names = [o["name"] for o in out]
        if len(set(names)) != len(names):
            raise ValueError("a parameter is listed twice")
        return out

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, value: list[BaselineName]) -> list[BaselineName]:
        if len(set(value)) != len(value):
            raise ValueError("a baseline is listed twice")
        if "greedy" in value and "singles" not in value:
            raise ValueError("greedy is built from the single-checkpoint scores: add singles")
        return value

    @property
    def scalarised(self) -> bool:
        """True when the study optimises the macro-average instead of a Pareto set."""
        return self.objective == "macro_average" or (
            self.objective is None and not SAMPLERS[self.sampler].multi_objective
        )

    @property
    def layer_groups(self) -> int | None:
        """K for `layers:K`, else None."""
        match = _GRANULARITY.match(self.granularity)
        return int(match.group(2)) if match and match.group(2) else None

    @field_serializer("tune")
    def _tune_as_written(self, tune: list[TuneSpec]) -> list[dict[str, list[float]]]:
        # The form the study file gives it in: {name: [low, high]}.
        return [{t.name: [t.low, t.high]} for t in tune]

    @property
    def enqueued_baselines(self) -> list[str]:
        """The baselines with `mwa` expanded into its two variants, in enqueue order."""
        out: list[str] = []
        for baseline in self.baselines:
            for name in ("mwa_loss", "mwa_step") if baseline == "mwa" else (baseline,):
                if name not in out:
                    out.append(name)
        return out
