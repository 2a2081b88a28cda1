"""Experiment 7: stratified evaluation (`eval.documents: stratified`) against scoring every
dev document, on three pools.

    python experiments/exp_stratified.py [--trials 100] [--pools llama:0 qwen2:1 qwen2:2]

Pools (`--pools ARCHITECTURE:SEED`, size small: 9 full checkpoints from three fine-tuning
runs at several steps, four trained skills, 200 dev documents each): the demo pool
(Llama, seed 0) and two Qwen2 pools built the same way (seeds 1 and 2). On each, two
real recycler searches (TPE seeded by the pool's seed, the four trained skills as
objectives, the uniform and single-checkpoint baselines, one weight per checkpoint and
layer half, two evaluation workers, `--trials` trials):

- `all`: every trial scores every dev document. It runs as `documents: stratified` with
  `agreed_sample: 1`, which samples every document of every stratum: the same documents,
  the same scores (the estimate of a fully sampled task is lm-eval's own aggregate), the
  same proposals, and each trial keeps every document's scores, which the estimate-error
  analysis below needs;
- `stratified`: `documents: stratified` with the defaults: documents all 9 checkpoints
  agree on, or all but one (`sampled_dissent: 0.15`), sampled (`agreed_sample: 0.1`);
- `unanimous`: only documents every checkpoint agrees on sampled (`sampled_dissent: 0`).

Measured:
1. the strata: per skill, the share of dev documents every checkpoint agrees on, all but
   one does, and the rest; how often the `all` search's merges flip the first two;
2. the error of an estimate of a trial's dev accuracy from a fraction of its documents,
   against the score over all of them, over the `all` search's trials (every document
   scored): a plain random subset, the stratified estimate (every contested document,
   the rest of the budget spread over the agreed strata), and a control-variate estimate
   (a random subset corrected by the weight-averaged checkpoints' correctness, whose mean
   over every document is known): root mean square error in points, 40 draws per trial;
3. cost (full-trial equivalents: documents scored over a full trial's) and the test
   hypervolume of the dev Pareto set after 40 and after `--trials` trials (reference
   point 0), each divided by that of the `all` search after `--trials` trials; and the
   `all` search at the cost each search spent.

Writes experiments/results/exp_stratified.{csv,md}.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import optuna
from expkit import (
    DEFAULT_WORKDIR,
    RESULTS,
    ROOT,
    TRAINED,
    Clock,
    ensure_pool,
    md_table,
    one_thread,
    write_rows_csv,
)
from searchkit import RecipeScores, checkpoint_weights

from recycler.config import load_study_spec, parse_study_spec
from recycler.evaluate.results import IDS
from recycler.evaluate.strata import CONTESTED, Strata
from recycler.search import front as pareto
from recycler.search.budget import trial_cost
from recycler.search.stored import (
    StudyView,
    TrialRecord,
    read_trial,
    stored_scored_docs,
    view_of,
)

# Each run's eval keys besides `documents: stratified` (none: the defaults).
RUNS: dict[str, dict[str, float]] = {
    "all": {"agreed_sample": 1.0},
    "stratified": {},
    "unanimous": {"sampled_dissent": 0.0},
}
MAXIMIZE = [True] * len(TRAINED)
REFERENCE = [0.0] * len(TRAINED)
FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7)
DRAWS = 40
EARLY = 40  # the trial count read besides the last


def study_file(folder: Path, zoo: Path, run: str, seed: int, trials: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "name": f"{run}-seed{seed}",
        "storage": "sqlite:///study.db",
        "pool": {"base": str(zoo / "base"), "checkpoints": [str(zoo / "checkpoints" / "*")]},
        "merge": {"method": "linear", "dtype": "float32", "params": {}},
        "search": {
            "weights": "simplex",
            "granularity": "layers:2",
            "sampler": "tpe",
            "n_trials": trials,
            "baselines": ["uniform", "singles"],
            "seed": seed,
        },
        "objectives": [{"name": s, "task": f"zoo_{s}", "metric": "acc"} for s in TRAINED],
        "eval": {
            "tasks_dir": str(zoo / "tasks"),
            "batch_size": 64,
            "documents": "stratified",
            **RUNS[run],
        },
        "cluster": {"eval_workers": 2},
    }
    path = folder / "study.yaml"
    return parse_study_spec(data, path).write(path)


def ensure_search(path: Path, say: Clock) -> optuna.Study:
    """The search of this study file, run (or resumed) to its trials."""
    from recycler.cluster.connect import start_ray
    from recycler.cluster.evaluator import RayEvaluator
    from recycler.search.budget import Budget
    from recycler.search.prepare import prepare
    from recycler.search.run import SearchDriver

    spec = load_study_spec(path)
    prepared = prepare(spec)
    try:
        budget = Budget.of(spec)
        if not budget.spent(prepared.handle.study):
            say(f"search {spec.name} ({budget.n_trials} trials)")
            start_ray(None)
            with SearchDriver(
                prepared,
                lambda: RayEvaluator.from_spec(spec, prepared.pool, prepared.suite),
                capacity=spec.cluster.eval_workers,
            ) as driver:
                driver.run(budget)
        return prepared.handle.study
    finally:
        prepared.pool.close()


def in_order(view: StudyView) -> list[TrialRecord]:
    """Finished trials by trial number: the order TPE proposed them in (two workers)."""
    return sorted(
        (r for r in view.trials if r.state in ("COMPLETE", "FAIL")), key=lambda r: r.number
    )


def test_hv(records: Sequence[TrialRecord], scores: RecipeScores) -> float:
    complete = [r for r in records if r.state == "COMPLETE" and r.vector_dev is not None]
    if not complete:
        return 0.0
    mask = pareto.pareto_mask([r.vector_dev for r in complete], MAXIMIZE)  # type: ignore[misc]
    vectors = [
        [scores.score(r.recipe or {})[s] for s in TRAINED] for r, on in zip(complete, mask) if on
    ]
    return pareto.hypervolume(vectors, REFERENCE, MAXIMIZE)


def cumulative_cost(view: StudyView, records: Sequence[TrialRecord]) -> list[float]:
    out, total = [], 0.0
    for r in records:
        total += trial_cost(r, view.dev_docs)[0]
        out.append(total)
    return out


def prefix_at_cost(costs: Sequence[float], cost: float) -> int:
    """How many trials (in order) fit in `cost`."""
    return sum(1 for c in costs if c <= cost + 1e-9)


# ---- the estimate error, from the `all` search's trials ---------------------------------


def estimate_errors(study: optuna.Study, strata: Strata, rng: random.Random) -> dict[str, Any]:
    """Per method and fraction, the RMSE (points) of a trial's estimated dev accuracy, over
    the search trials of a search that scored every document; and the flip rates."""
    checkpoints = {}
    trials = []
    for t in study.get_trials(deepcopy=False):
        docs = stored_scored_docs(t.user_attrs)
        label = t.user_attrs.get("baseline")
        if docs is None or t.state.name != "COMPLETE":
            continue
        if isinstance(label, str) and label.startswith("single:"):
            checkpoints[label.removeprefix("single:")] = docs
        elif label is None:
            trials.append((t, docs))
    squared: dict[tuple[str, float], list[float]] = {}
    flips: dict[tuple[str, bool], list[float]] = {}  # (skill, unanimous) -> per trial
    for t, docs in trials:
        weights = checkpoint_weights(read_trial(t))
        for skill in TRAINED:
            task = f"zoo_{skill}"
            y = [float(v) for v in docs[task]["acc,none"]]
            ids = docs[task][IDS]
            n = len(y)
            full = statistics.fmean(y)
            # The control: the weight-averaged checkpoints' correctness per document.
            x = [
                sum(w * float(checkpoints[c][task]["acc,none"][i]) for c, w in weights.items())
                for i in range(n)
            ]
            x_mean = statistics.fmean(x)
            task_strata = strata.tasks[task]
            position = {d: i for i, d in enumerate(ids)}
            agreed = {k: v for k, v in task_strata.docs.items() if k != CONTESTED}
            n_agreed = sum(len(v) for v in agreed.values())
            for unanimous in (True, False):
                kinds = [k for k in agreed if ("dissent" not in k) == unanimous]
                n_kind = sum(len(agreed[k]) for k in kinds)
                if n_kind:
                    flipped = sum(
                        y[position[d]] != task_strata.agreed[k][0] for k in kinds for d in agreed[k]
                    )
                    flips.setdefault((skill, unanimous), []).append(flipped / n_kind)
            contested = [position[d] for d in task_strata.docs[CONTESTED]]
            for f in FRACTIONS:
                m = max(2, round(f * n))
                for _ in range(DRAWS):
                    pick = rng.sample(range(n), m)
                    plain = statistics.fmean(y[i] for i in pick)
                    squared.setdefault(("plain", f), []).append((plain - full) ** 2)
                    xs, ys = [x[i] for i in pick], [y[i] for i in pick]
                    vx = statistics.pvariance(xs)
                    b = (
                        statistics.fmean(
                            (a - statistics.fmean(xs)) * (c - plain) for a, c in zip(xs, ys)
                        )
                        / vx
                        if vx > 0
                        else 0.0
                    )
                    cv = plain - b * (statistics.fmean(xs) - x_mean)
                    squared.setdefault(("control variate", f), []).append((cv - full) ** 2)
                    left = m - len(contested)
                    if left < 2 * len(agreed):
                        continue  # the contested documents alone cost more than this fraction
                    est = sum(y[i] for i in contested) / n
                    for v in agreed.values():
                        take = min(len(v), max(1, round(left * len(v) / n_agreed)))
                        sample = rng.sample(v, take)
                        est += len(v) / n * statistics.fmean(y[position[d]] for d in sample)
                    squared.setdefault(("stratified", f), []).append((est - full) ** 2)
    rmse = {key: 100 * math.sqrt(statistics.fmean(v)) for key, v in squared.items()}
    return {"rmse": rmse, "flips": {key: statistics.fmean(v) for key, v in flips.items()}}


# ---- the run --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--size", default="small", choices=["micro", "small"])
    ap.add_argument("--pools", nargs="+", default=["llama:0", "qwen2:1", "qwen2:2"])
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "experiments" / "_runs" / "stratified")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    say = Clock()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows: list[dict[str, Any]] = []
    pools: list[dict[str, Any]] = []
    errors: dict[str, dict[tuple[str, float], float]] = {}
    with one_thread():
        for pool in args.pools:
            architecture, seed_text = pool.split(":")
            seed = int(seed_text)
            zoo = ensure_pool(
                args.workdir, args.size, seed, say, architecture=architecture
            ).resolve()
            folder = args.runs_dir / f"{args.size}-{architecture}-seed{seed}"
            studies = {
                run: ensure_search(study_file(folder / run, zoo, run, seed, args.trials), say)
                for run in RUNS
            }
            scores = RecipeScores(seed, say, zoo=zoo, path=folder / "recipe_scores.json")
            views = {run: view_of(s) for run, s in studies.items()}
            orders = {run: in_order(v) for run, v in views.items()}
            costs = {run: cumulative_cost(views[run], orders[run]) for run in RUNS}
            reference = test_hv(orders["all"][: args.trials], scores)
            strata = Strata.from_record(studies["stratified"].user_attrs["recycler:strata"])
            found = estimate_errors(studies["all"], strata, random.Random(seed))
            errors[pool] = found["rmse"]
            pools.append({"pool": pool, "strata": strata, "flips": found["flips"]})
            for run in RUNS:
                for n in sorted({min(EARLY, args.trials), args.trials}):
                    spent = costs[run][min(n, len(costs[run])) - 1]
                    # The all-documents search at this one's cost.
                    k = prefix_at_cost(costs["all"], spent)
                    estimated = sum(1 for r in orders[run][:n] if r.dev_stderr is not None)
                    rows.append(
                        {
                            "pool": pool,
                            "run": run,
                            "trials": n,
                            "cost": round(spent, 2),
                            "cost_share": round(
                                spent / costs["all"][min(n, len(costs["all"])) - 1], 3
                            ),
                            "estimated_trials": estimated,
                            "test_hv": round(test_hv(orders[run][:n], scores) / reference, 4),
                            "all_at_equal_cost_trials": k,
                            "all_at_equal_cost_test_hv": round(
                                test_hv(orders["all"][:k], scores) / reference, 4
                            ),
                        }
                    )
            say(f"pool {pool} done")
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(rows, args.out / "exp_stratified.csv")
    (args.out / "exp_stratified.md").write_text(report(rows, pools, errors, say.elapsed()))
    say(f"wrote {args.out / 'exp_stratified.md'}")
    return 0


def report(
    rows: Sequence[dict[str, Any]],
    pools: Sequence[dict[str, Any]],
    errors: Mapping[str, Mapping[tuple[str, float], float]],
    wall: float,
) -> str:
    lines = ["# Experiment 7: stratified evaluation", ""]
    lines.append("## The strata, and how often the all-documents search's merges flip them")
    lines += [
        "",
        "Per skill: the share of dev documents all 9 checkpoints agree on, those all but one "
        "agree on, and the rest (contested, scored in full); the share of the first two a "
        "merge scores otherwise than the checkpoints' (majority) value, over the search's "
        "trials.",
        "",
    ]
    table = []
    for p in pools:
        for skill in TRAINED:
            task = p["strata"].tasks[f"zoo_{skill}"]
            n = task.n_docs
            unanimous = sum(
                len(d) for k, d in task.docs.items() if k != CONTESTED and "dissent" not in k
            )
            contested = len(task.docs[CONTESTED])
            table.append(
                [
                    p["pool"],
                    skill,
                    f"{100 * unanimous / n:.0f} %",
                    f"{100 * (n - unanimous - contested) / n:.0f} %",
                    f"{100 * contested / n:.0f} %",
                    *(
                        f"{100 * p['flips'][(skill, u)]:.1f} %" if (skill, u) in p["flips"] else "—"
                        for u in (True, False)
                    ),
                ]
            )
    lines.append(
        md_table(
            [
                "pool",
                "skill",
                "unanimous",
                "one dissents",
                "contested",
                "flipped: unanimous",
                "flipped: one dissents",
            ],
            table,
        )
    )
    lines += ["", "## Estimate error (RMSE, points of accuracy) by fraction of documents", ""]
    methods = ("plain", "stratified", "control variate")
    table = []
    for pool, rmse in errors.items():
        for method in methods:
            table.append(
                [
                    pool,
                    method,
                    *(
                        f"{rmse[(method, f)]:.2f}" if (method, f) in rmse else "—"
                        for f in FRACTIONS
                    ),
                ]
            )
    lines.append(md_table(["pool", "estimate", *(f"{round(100 * f)} %" for f in FRACTIONS)], table))
    lines += [
        "",
        "— : the contested documents alone are more than that fraction.",
        "",
        "## Searches: cost and test hypervolume (÷ the all-documents search's at its end)",
        "",
    ]
    lines.append(
        md_table(
            [
                "pool",
                "search",
                "trials",
                "cost (full trials)",
                "cost ÷ all's",
                "estimated trials",
                "test HV",
                "all-documents search at equal cost: trials",
                "its test HV",
            ],
            [
                [
                    r["pool"],
                    r["run"],
                    r["trials"],
                    r["cost"],
                    f"{r['cost_share']:.2f}",
                    r["estimated_trials"],
                    f"{r['test_hv']:.3f}",
                    r["all_at_equal_cost_trials"],
                    f"{r['all_at_equal_cost_test_hv']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    lines += ["", f"Wall time: {wall:.0f} s on this machine (2 shared cores).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
