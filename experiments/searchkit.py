"""Searches on the demo pool for experiments 1, 4 and 5 (exp_recycle.py, exp_samplers.py,
exp_objectives.py), run once and shared by the three.

    python experiments/searchkit.py [--seeds 0 1 2] [--runs tpe cmaes …]   # run/resume them all

Every run is a real recycler study: a study file written under `experiments/_runs/`
(git-ignored), its SQLite storage beside it, and recycler's own search loop
(`SearchDriver` over `RayEvaluator`: a local Ray cluster, lm-eval on the dev split,
two evaluation workers). A run already complete in its storage is not run again, and a
run that was stopped resumes where it stopped, so the three experiment scripts can ask
for the same run and only the first pays for it.

The objectives are the four trained skills (inc, dec, rev, rot) only: `sort`, the skill
no run trains, stays out of every search and is scored on the test split only, as the
held-out skill. The pool's seed is also the sampler's seed. Test-split scores of the
chosen models are computed in-process (`RecipeScores`) and cached per pool.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from expkit import (
    DEFAULT_WORKDIR,
    RESULTS,
    ROOT,
    TRAINED,
    Clock,
    TestScorer,
    ensure_pool,
    one_thread,
)

from recycler.config import load_study_spec, parse_study_spec
from recycler.merge.methods import METHODS
from recycler.samplers import effective_seed
from recycler.search.stored import StudyView, view_of
from recycler.search.study import macro_average

EVAL_WORKERS = 2


@dataclass
class Settings:
    """What every run of this process uses; the scripts' common options set it (`configure`)."""

    size: str = "small"
    workdir: Path = DEFAULT_WORKDIR  # the pools
    runs_dir: Path = ROOT / "experiments" / "_runs"  # the studies and score caches (git-ignored)
    budget: int = 50  # evaluations per search (and per tuned merge method)

    def folder(self, seed: int) -> Path:
        return self.runs_dir / f"{self.size}-seed{seed}"

    def zoo(self, seed: int, say: Clock) -> Path:
        return ensure_pool(self.workdir, self.size, seed, say)


SETTINGS = Settings()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", default=SETTINGS.size, choices=["micro", "small"])
    ap.add_argument(
        "--workdir",
        type=Path,
        default=SETTINGS.workdir,
        help="where the pools are built and cached",
    )
    ap.add_argument(
        "--runs-dir", type=Path, default=SETTINGS.runs_dir, help="where the searches are stored"
    )
    ap.add_argument("--budget", type=int, default=SETTINGS.budget, help="evaluations per search")


def configure(args: argparse.Namespace) -> None:
    SETTINGS.size, SETTINGS.workdir, SETTINGS.runs_dir, SETTINGS.budget = (
        args.size,
        args.workdir,
        args.runs_dir,
        args.budget,
    )


def experiment_args(
    doc: str,
    argv: Sequence[str] | None,
    more: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The command line of an experiment over the shared searches: the settings above
    plus --out (the results folder) and the experiment's own (`more`), parsed and applied."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--out", type=Path, default=RESULTS)
    if more is not None:
        more(ap)
    args = ap.parse_args(argv)
    configure(args)
    return args


@dataclass(frozen=True)
class RunSpec:
    """One search configuration; run once per pool seed."""

    key: str
    sampler: str
    granularity: str = "model"
    objective: str = "pareto"  # or macro_average
    baselines: tuple[str, ...] = ()  # recycler's baselines, enqueued before the sampler's trials
    method: str = "linear"
    tune: tuple[tuple[str, float, float], ...] = ()  # method parameters searched with the weights
    capacity: int = EVAL_WORKERS
    # Multi-fidelity (search.fidelity: rungs, eta); the run then spends the search's budget
    # in full-trial equivalents (search.budget) times `cost_share` instead of trials.
    fidelity: tuple[tuple[float, ...], float] | None = None
    cost_share: float = 1.0

    def cost(self) -> float | None:
        """The budget in full-trial equivalents of a multi-fidelity run, else None."""
        return None if self.fidelity is None else SETTINGS.budget * self.cost_share

    def n_trials(self, n_checkpoints: int) -> int:
        if self.key == "baselines":
            # The uniform soup, every single checkpoint, and at most n - 1 greedy steps.
            return 2 * n_checkpoints
        return SETTINGS.budget


RUNS: dict[str, RunSpec] = {
    r.key: r
    for r in (
        # The baselines of recycler's search, alone: uniform soup, every single checkpoint and the
        # greedy soup (one trial at a time, so the greedy steps are not interleaved with random
        # ones).
        RunSpec("baselines", "random", baselines=("uniform", "singles", "greedy"), capacity=1),
        RunSpec("tpe", "tpe"),
        RunSpec("cmaes", "cmaes", objective="macro_average"),
        RunSpec("tpe-macro", "tpe", objective="macro_average"),
        RunSpec("tpe-seeded", "tpe", baselines=("uniform", "singles", "mwa", "greedy")),
        RunSpec("nsga2", "nsga2"),
        RunSpec("gp", "gp"),
        RunSpec("random", "random"),
        RunSpec("tpe-layers2", "tpe", granularity="layers:2"),
        # Simplex weights times a searched λ: the merge may scale the task vectors beyond their
        # mean.
        RunSpec("tpe-ta", "tpe", method="task_arithmetic", tune=(("lambda", 0.5, 3.0),)),
        # Experiment 6: tpe with multi-fidelity trials at the cost of the tpe run's.
        RunSpec("tpe-mf", "tpe", fidelity=((0.11, 0.33, 1.0), 3)),
        RunSpec("tpe-mf-2rungs", "tpe", fidelity=((0.25, 1.0), 4)),
        RunSpec("tpe-mf-gentle", "tpe", fidelity=((0.33, 1.0), 2)),
    )
}


def study_path(run: RunSpec, seed: int, zoo: Path) -> Path:
    """Write (or rewrite, identically) this run's study file; its storage lies beside it."""
    folder = SETTINGS.folder(seed) / run.key
    folder.mkdir(parents=True, exist_ok=True)
    n_checkpoints = sum(1 for p in (zoo / "checkpoints").iterdir() if p.is_dir())
    data: dict[str, Any] = {
        "name": f"{run.key}-seed{seed}",
        "storage": "sqlite:///study.db",
        "pool": {"base": str(zoo / "base"), "checkpoints": [str(zoo / "checkpoints" / "*")]},
        "merge": {"method": run.method, "dtype": "float32", "params": {}},
        "search": {
            "weights": "simplex",
            "granularity": run.granularity,
            "sampler": run.sampler,
            "objective": run.objective,
            **(
                {"n_trials": run.n_trials(n_checkpoints)}
                if run.fidelity is None
                else {
                    "budget": run.cost(),
                    "fidelity": {"rungs": list(run.fidelity[0]), "eta": run.fidelity[1]},
                }
            ),
            "baselines": list(run.baselines),
            "seed": seed,
            **({"tune": [{name: [low, high]} for name, low, high in run.tune]} if run.tune else {}),
        },
        "objectives": [{"name": s, "task": f"zoo_{s}", "metric": "acc"} for s in TRAINED],
        "eval": {"tasks_dir": str(zoo / "tasks"), "split": "dev", "batch_size": 64},
        "cluster": {"eval_workers": run.capacity},
    }
    path = folder / "study.yaml"
    return parse_study_spec(data, path).write(path)


def ensure_run(run: RunSpec, seed: int, say: Clock) -> StudyView:
    """The run's stored study, after running (or resuming) it to its budget."""
    from recycler.cluster.connect import start_ray
    from recycler.cluster.evaluator import RayEvaluator
    from recycler.search.budget import Budget
    from recycler.search.prepare import prepare
    from recycler.search.run import SearchDriver

    spec = load_study_spec(study_path(run, seed, SETTINGS.zoo(seed, say)))
    prepared = prepare(spec)
    budget = Budget.of(spec)
    try:
        view = view_of(prepared.handle.study)
        wanted = budget.n_trials if budget.cost is None else budget.cost
        if not budget.spent(prepared.handle.study):  # what the driver counts, failures not
            size = f"{wanted} trials" if budget.cost is None else f"{wanted:g} full-trial costs"
            say(f"seed {seed}: search {run.key} ({size})")
            start_ray(None)  # one local cluster for every run of this process
            with SearchDriver(
                prepared,
                lambda: RayEvaluator.from_spec(spec, prepared.pool, prepared.suite),
                capacity=run.capacity,
            ) as driver:
                driver.run(budget)
            view = view_of(prepared.handle.study)
            say(f"seed {seed}: search {run.key} done")
        return view
    finally:
        prepared.pool.close()


def dev_macro(view: StudyView, record: Any) -> float:
    """The mean of the four trained skills on dev (every objective is maximised)."""
    return macro_average(record.objectives, view.objectives)


def checkpoint_weights(record: Any) -> dict[str, float]:
    """checkpoint name → weight; for per-group weights, the mean over the groups."""
    out: dict[str, float] = {}
    for name, w in record.weights.items():
        out[name] = sum(w.values()) / len(w) if isinstance(w, Mapping) else float(w)
    return out


class RecipeScores:
    """Scores of recipes on one pool (skill → acc, plus `mean4` and `zoo_mean`), computed
    in-process by `expkit.TestScorer` (the search's own lm-eval path) and cached on disk."""

    def __init__(
        self, seed: int, say: Clock, *, zoo: Path | None = None, path: Path | None = None
    ) -> None:
        """The pool of `seed` and its cache file in this run's folder, unless given."""
        self.zoo = zoo or SETTINGS.zoo(seed, say)
        self.path = path or SETTINGS.folder(seed) / "recipe_scores.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cache: dict[str, dict[str, float]] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {}
        )
        self._scorer: TestScorer | None = None

    def score(self, recipe: Mapping[str, Any], split: str = "test") -> dict[str, float]:
        from recycler.merge.engine import merge_state_dict
        from recycler.merge.recipe import Recipe
        from recycler.pool import Pool
        from recycler.search.cache import recipe_key

        key = f"{split}:{recipe_key(dict(recipe))}"
        if key not in self.cache:
            parsed = Recipe.from_dict(dict(recipe), where="trial recipe")
            base = Path(parsed.base_model) if parsed.base_model else None
            pool = Pool.from_paths([Path(m.model) for m in parsed.models], base=base)
            try:
                weights = merge_state_dict(pool, parsed)
            finally:
                pool.close()
            if self._scorer is None:
                self._scorer = TestScorer(self.zoo)
            row = self._scorer.score(weights, split=split)
            self.cache[key] = row
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.cache, indent=1, sort_keys=True))
            tmp.replace(self.path)
        return self.cache[key]


# Merges with equal weights whose own hyperparameters are tuned at the search's budget
# (experiment 1). Weights are 1 each, so task arithmetic's λ scales the sum of the 9 task
# vectors (λ = 1/9 is their mean); TIES normalises its disjoint mean by the weights.
TUNED: dict[str, dict[str, tuple[float, float]]] = {
    "task_arithmetic": {"lambda": (0.02, 1.0)},
    "ties": {"density": (0.1, 1.0), "lambda": (0.5, 2.0)},
    "dare_ties": {"density": (0.1, 1.0), "lambda": (0.5, 2.0)},
}


def tuned_recipe(method: str, params: Mapping[str, float], seed: int, zoo: Path) -> dict[str, Any]:
    checkpoints = sorted(p for p in (zoo / "checkpoints").iterdir() if p.is_dir())
    recipe: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in checkpoints],
        "parameters": {k: round(float(v), 6) for k, v in params.items()},
        "dtype": "float32",
    }
    if METHODS[method].random:
        recipe["random_seed"] = seed
    return recipe


def ensure_tuned(method: str, seed: int, say: Clock) -> tuple[dict[str, Any], int, None]:
    """(best recipe on dev, evaluations, None): TPE over the method's hyperparameters, the
    search's budget of dev evaluations in an Optuna SQLite study (resumable), dev mean of the
    trained skills."""
    import optuna

    scores = RecipeScores(seed, say)
    folder = SETTINGS.folder(seed) / f"tuned-{method}"
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=method,
        storage=f"sqlite:///{folder / 'study.db'}",
        direction="maximize",
        load_if_exists=True,
    )
    # Seeded as recycler seeds its samplers: a resumed study does not replay its first proposals.
    study.sampler = optuna.samplers.TPESampler(
        seed=effective_seed(seed, len(study.get_trials(deepcopy=False)))
    )
    for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # left by a killed run
    budget = SETTINGS.budget
    done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    if done < budget:
        say(f"seed {seed}: tuning {method} ({budget - done} dev evaluations left)")
    for _ in range(budget - done):
        trial = study.ask()
        params = {k: trial.suggest_float(k, lo, hi) for k, (lo, hi) in TUNED[method].items()}
        recipe = tuned_recipe(method, params, seed, scores.zoo)
        trial.set_user_attr("recipe", recipe)
        study.tell(trial, scores.score(recipe, "dev")["mean4"])
    best = study.best_trial
    return best.user_attrs["recipe"], budget, None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = ap.parse_args(argv)
    configure(args)
    say = Clock()
    with one_thread():
        for key in args.runs:
            for seed in args.seeds:
                ensure_run(RUNS[key], seed, say)
    say("all runs complete")


if __name__ == "__main__":
    main()
