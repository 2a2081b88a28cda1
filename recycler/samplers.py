"""The samplers a study may name (`search.sampler`), each described once: how it is built,
the objectives it handles, what it learns from, its random start-up trials. The study file
(`search_spec`), the search driver and the README's sampler table all read `SAMPLERS`.

Seeding: a fresh study with the same seed proposes the same weights. A resumed study
offsets the seed by the number of trials already stored, because a sampler seeded anew
would otherwise replay its first random proposals, the ones the study already holds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import optuna

from recycler.errors import RecyclerError

# What a sampler's model is fitted to: trials told complete, pruned ones too (a
# multi-fidelity study's many pruned trials then count), or nothing (it samples blindly).
LearnsFrom = Literal["complete and pruned trials", "complete trials", "nothing"]


@dataclass(frozen=True)
class SamplerDescription:
    """One sampler: everything the study file, the driver and the docs say about it."""

    name: str
    summary: str
    # False: one value only, so the study optimises the macro-average of the objectives.
    multi_objective: bool
    learns_from: LearnsFrom
    # The random trials it proposes before its model is used, for a budget of n_trials.
    startup_trials: Callable[[int], int]
    # `startup_trials` in words, for the README's table.
    startup_rule: str
    # (seed, n_trials) -> the Optuna sampler.
    build: Callable[[int, int], optuna.samplers.BaseSampler]
    # A package it needs beyond Optuna's own requirements, imported to check it is there.
    needs_package: str | None = None

    @property
    def ignores_pruned(self) -> bool:
        """True when its model learns from complete trials only: a multi-fidelity search's
        many pruned trials teach it nothing."""
        return self.learns_from == "complete trials"


def effective_seed(seed: int, n_existing_trials: int) -> int:
    """The seed for a sampler created when the study already holds `n_existing_trials`."""
    # Keep it in numpy's accepted range (0 .. 2**32 - 1).
    return (seed + 1_000_003 * n_existing_trials) % (2**32)


def nsga2_population(n_trials: int) -> int:
    """NSGA-II's generation size for a budget: about five generations, 8 to 50 trials each.

    Optuna's default (50) fills a whole 50-trial budget with its random first generation,
    so the search never evolves (experiment 4 measured it: identical to `random`).
    """
    return max(8, min(50, n_trials // 5))


def _tpe(seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    # constant_liar: trials still running count as bad guesses, so several workers asking
    # at once do not all get the same proposal. multivariate: the simplex coordinates are
    # strongly coupled; modelling them jointly helps.
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=True,
        constant_liar=True,
        n_startup_trials=SAMPLERS["tpe"].startup_trials(n_trials),
    )


def _nsga2(seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=nsga2_population(n_trials))


def _gp(seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=SAMPLERS["gp"].startup_trials(n_trials)
    )


def _random(seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _cmaes(seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.CmaEsSampler(
        seed=seed, n_startup_trials=SAMPLERS["cmaes"].startup_trials(n_trials)
    )


SAMPLERS: dict[str, SamplerDescription] = {
    s.name: s
    for s in (
        SamplerDescription(
            name="tpe",
            summary="Tree-structured Parzen estimator, multivariate, constant liar (the default)",
            multi_objective=True,
            learns_from="complete and pruned trials",
            startup_trials=lambda n_trials: 10,
            startup_rule="10",
            build=_tpe,
        ),
        SamplerDescription(
            name="nsga2",
            summary="NSGA-II: generations of a genetic algorithm on the Pareto ranks",
            multi_objective=True,
            learns_from="complete trials",
            startup_trials=nsga2_population,
            startup_rule="one generation: n_trials // 5, within 8 to 50",
            build=_nsga2,
        ),
        SamplerDescription(
            name="gp",
            summary="Gaussian-process Bayesian optimisation",
            multi_objective=True,
            learns_from="complete trials",
            startup_trials=lambda n_trials: 10,
            startup_rule="10",
            build=_gp,
        ),
        SamplerDescription(
            name="random",
            summary="Independent uniform draws: the yardstick",
            multi_objective=True,
            learns_from="nothing",
            startup_trials=lambda n_trials: n_trials,
            startup_rule="every trial",
            build=_random,
        ),
        SamplerDescription(
            name="cmaes",
            summary="CMA-ES on the macro-average (the setting of Khalifa et al. 2024)",
            multi_objective=False,
            learns_from="complete trials",
            startup_trials=lambda n_trials: 1,
            startup_rule="1",
            build=_cmaes,
            needs_package="cmaes",
        ),
    )
}


def make_sampler(
    name: str, seed: int, *, n_objectives: int, n_trials: int = 50
) -> optuna.samplers.BaseSampler:
    """A sampler for a study with `n_objectives` objective values (1 for a sampler of one
    objective) and a budget of `n_trials`."""
    sampler = SAMPLERS.get(name)
    if sampler is None:
        raise RecyclerError(f"search.sampler: unknown sampler {name!r}")
    if n_objectives != 1 and not sampler.multi_objective:
        # The study then optimises the macro-average (search.objective) and keeps every
        # objective as user attrs.
        raise RecyclerError(f"search.sampler: {name} optimises one value (the macro-average)")
    if sampler.needs_package is not None:
        try:
            # Optuna imports it only at the first proposal, deep inside a search.
            importlib.import_module(sampler.needs_package)
        except ImportError:
            raise RecyclerError(
                f"search.sampler: {name} needs the {sampler.needs_package!r} package "
                f"(pip install {sampler.needs_package})"
            ) from None
    return sampler.build(seed, n_trials)


def sampler_table() -> str:
    """The README's sampler table (Markdown), from the descriptions."""
    lines = [
        "| sampler | what it is | objectives | learns from | random start-up trials |",
        "|---|---|---|---|---|",
    ]
    for s in SAMPLERS.values():
        objectives = "Pareto or macro-average" if s.multi_objective else "macro-average only"
        lines.append(
            f"| `{s.name}` | {s.summary} | {objectives} | {s.learns_from} | {s.startup_rule} |"
        )
    return "\n".join(lines)
