"""The study file's `search.sampler` → a seeded Optuna sampler.

Seeding: a fresh study with the same seed proposes the same weights. A resumed study
offsets the seed by the number of trials already stored, because a sampler seeded anew
would otherwise replay its first random proposals, the ones the study already holds.
"""

from __future__ import annotations

import optuna

from recycler.errors import RecyclerError


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


def make_sampler(
    name: str, seed: int, *, n_objectives: int, n_trials: int = 50
) -> optuna.samplers.BaseSampler:
    """A sampler for a study with `n_objectives` objective values (1 for cmaes) and a budget of `n_trials`."""
    if name == "tpe":
        # constant_liar: trials still running count as bad guesses, so several workers
        # asking at once do not all get the same proposal. multivariate: the simplex
        # coordinates are strongly coupled; modelling them jointly helps.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=nsga2_population(n_trials))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        if n_objectives != 1:
            # The study then optimises the macro-average (search.objective) and keeps every
            # objective as user attrs.
            raise RecyclerError("search.sampler: cmaes optimises one value (the macro-average)")
        try:
            import cmaes  # noqa: F401  (Optuna's CmaEsSampler needs it at the first proposal)
        except ImportError:
            raise RecyclerError(
                "search.sampler: cmaes needs the 'cmaes' package (pip install cmaes)"
            ) from None
        return optuna.samplers.CmaEsSampler(seed=seed)
    raise RecyclerError(f"search.sampler: unknown sampler {name!r}")
