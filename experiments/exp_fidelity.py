"""Experiment 6: multi-fidelity trials (ASHA over nested document subsets) against
full-fidelity trials, at equal cost in documents scored.

    python experiments/exp_fidelity.py [--seeds 0 1 2] [--budget 50] [--settings tpe-mf …]

On each demo pool (`--size small`, pool seeds 0, 1, 2, which also seed TPE; the 9 full
checkpoints, simplex weights, the four trained skills as objectives, no baselines, two
evaluation workers), three searches from `searchkit`:

- `tpe`: every trial scores every dev document (`--budget` trials, default 50);
- `tpe-mf`: `search.fidelity: {rungs: [0.11, 0.33, 1.0], eta: 3}`, run until it has
  scored as many documents as `tpe` (`search.budget: 50` full-trial equivalents);
- `tpe-mf-2rungs`: `{rungs: [0.25, 1.0], eta: 4}`, the same cost;
- `tpe-mf-gentle`: `{rungs: [0.33, 1.0], eta: 2}`, the same cost.

The cost of a search so far is the documents its trials scored, in full trials (what
`recycler front` reports). After every finished trial, the Pareto set of the trials
complete at full fidelity is taken on dev (what the search would ship from), and its
hypervolume is measured on the test split, with the reference point at 0 for every
skill; each pool's numbers are divided by the final test hypervolume of its `tpe` run
(1.0: the full-fidelity search's end point). Read at 40 % and at 100 % of the cost, and
the least cost at which each search reaches 1.0. A multi-fidelity search stopped at 40 %
of the budget is the start of the one at 100 %: TPE's proposals do not depend on the
budget, and a search spends it in the order it runs.

Also: how often a trial pruned at the first rung would have reached the final Pareto
set (dev) of its search, found by scoring a seeded sample of them on every dev document.
Writes experiments/results/exp_fidelity.{csv,md,png}.
"""

from __future__ import annotations

import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from expkit import TRAINED, Clock, md_table, one_thread, save_figure, write_rows_csv
from searchkit import RUNS, SETTINGS, RecipeScores, ensure_run, experiment_args

from recycler.search import front as pareto
from recycler.search.budget import trial_cost
from recycler.search.stored import StudyView, TrialRecord

KEYS = ("tpe", "tpe-mf", "tpe-mf-2rungs", "tpe-mf-gentle")
LABELS = {
    "tpe": "full fidelity (50 trials)",
    "tpe-mf": "multi-fidelity, rungs 0.11 / 0.33 / 1, eta 3",
    "tpe-mf-2rungs": "multi-fidelity, rungs 0.25 / 1, eta 4",
    "tpe-mf-gentle": "multi-fidelity, rungs 0.33 / 1, eta 2",
}
SHARES = (0.4, 1.0)
PRUNED_SAMPLE = 8  # first-rung-pruned trials per pool re-scored on every dev document
MAXIMIZE = [True] * len(TRAINED)
REFERENCE = [0.0] * len(TRAINED)


def finished_in_order(view: StudyView) -> list[TrialRecord]:
    """The trials that finished (complete, pruned or failed), in the order they did; a
    stale trial's finished rungs are counted once, by it (its re-run carries them)."""
    done = [r for r in view.trials if r.state in ("COMPLETE", "PRUNED", "FAIL")]
    return sorted(done, key=lambda r: (r.completed_at or 0.0, r.number))


def curve(view: StudyView, scores: RecipeScores) -> list[dict[str, float]]:
    """After each finished trial: cost so far, wall seconds, and the test hypervolume of the
    dev Pareto set of the trials complete so far."""
    trials = finished_in_order(view)
    if not trials:
        return []
    first = trials[0]
    start = (first.completed_at or 0.0) - (first.merge_seconds or 0.0) - (first.eval_seconds or 0.0)
    cost, complete, out = 0.0, [], []
    for r in trials:
        cost += trial_cost(r, view.dev_docs)[0]
        if r.state == "COMPLETE" and r.vector_dev is not None:
            complete.append(r)
        out.append(
            {
                "cost": cost,
                "wall": (r.completed_at or start) - start,
                "hv": test_hypervolume(complete, scores),
                "complete": float(len(complete)),
                "trials": float(len(out) + 1),
            }
        )
    return out


def test_hypervolume(complete: Sequence[TrialRecord], scores: RecipeScores) -> float:
    if not complete:
        return 0.0
    mask = pareto.pareto_mask([r.vector_dev for r in complete], MAXIMIZE)  # type: ignore[misc]
    front = [r for r, on in zip(complete, mask) if on]
    vectors = [[scores.score(r.recipe or {})[s] for s in TRAINED] for r in front]
    return pareto.hypervolume(vectors, REFERENCE, MAXIMIZE)


def at_cost(points: Sequence[dict[str, float]], cost: float) -> dict[str, float]:
    """The state once `cost` is spent: the last point at or below it (a trial that crosses
    it is not counted)."""
    below = [p for p in points if p["cost"] <= cost + 1e-9]
    return below[-1] if below else {"cost": 0.0, "wall": 0.0, "hv": 0.0, "complete": 0.0}


def cost_to_reach(points: Sequence[dict[str, float]], target: float) -> float | None:
    return next((p["cost"] for p in points if p["hv"] >= target - 1e-12), None)


def pruned_early_reach_front(view: StudyView, scores: RecipeScores, seed: int) -> tuple[int, int]:
    """(how many of a seeded sample of first-rung-pruned trials would be on the final dev
    Pareto set, sample size), each scored on every dev document."""
    pruned = [r for r in view.trials if r.state == "PRUNED" and r.highest_rung == 0]
    sample = random.Random(seed).sample(pruned, min(PRUNED_SAMPLE, len(pruned)))
    final = [r.vector_dev for r in view.complete if r.vector_dev is not None]
    hits = 0
    for r in sample:
        dev = scores.score(r.recipe or {}, "dev")
        vector = [dev[s] for s in TRAINED]
        if not any(pareto.dominates(f, vector, MAXIMIZE) for f in final):
            hits += 1
    return hits, len(sample)


def main(argv: Sequence[str] | None = None) -> int:
    args = experiment_args(
        __doc__ or "",
        argv,
        lambda ap: ap.add_argument(
            "--settings",
            nargs="+",
            choices=KEYS[1:],
            default=list(KEYS[1:]),
            help="the multi-fidelity searches to run against tpe (default: all)",
        ),
    )
    keys = ("tpe", *args.settings)
    args.out.mkdir(parents=True, exist_ok=True)
    say = Clock()
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[list[dict[str, float]]]] = {k: [] for k in keys}
    early: list[tuple[int, int]] = []
    budget = float(SETTINGS.budget)
    with one_thread():
        for seed in args.seeds:
            scores = RecipeScores(seed, say)
            views = {key: ensure_run(RUNS[key], seed, say) for key in keys}
            points = {key: curve(views[key], scores) for key in keys}
            full_end = points["tpe"][-1]["hv"] if points["tpe"] else 0.0
            if full_end <= 0:
                raise SystemExit(f"seed {seed}: the full-fidelity search has no test hypervolume")
            for key in keys:
                normalised = [{**p, "hv": p["hv"] / full_end} for p in points[key]]
                curves[key].append(normalised)
                row: dict[str, Any] = {"seed": seed, "run": key}
                for share in SHARES:
                    p = at_cost(normalised, share * budget)
                    pct = round(share * 100)
                    row[f"hv_at_{pct}"] = p["hv"]
                    row[f"wall_at_{pct}"] = p["wall"]
                    row[f"complete_at_{pct}"] = int(p["complete"])
                row["trials"] = len(normalised)
                row["cost"] = normalised[-1]["cost"] if normalised else 0.0
                reached = cost_to_reach(normalised, 1.0)
                row["cost_to_full_hv"] = reached if reached is not None else ""
                rows.append(row)
            early.append(pruned_early_reach_front(views["tpe-mf"], scores, seed))
            say(f"seed {seed}: done")
    write_rows_csv(rows, args.out / "exp_fidelity.csv")
    (args.out / "exp_fidelity.md").write_text(report(rows, early, args.seeds, say.elapsed()))
    plot(curves, budget, args.out / "exp_fidelity.png")
    say(f"wrote {args.out / 'exp_fidelity.md'}")
    return 0


def _mean_sd(values: Sequence[float], digits: int = 2) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def report(
    rows: Sequence[dict[str, Any]],
    early: Sequence[tuple[int, int]],
    seeds: Sequence[int],
    wall: float,
) -> str:
    budget = SETTINGS.budget
    table = []
    for key in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == key]
        reached = [r["cost_to_full_hv"] for r in mine]
        table.append(
            [
                LABELS[key],
                _mean_sd([r["hv_at_40"] for r in mine]),
                _mean_sd([r["hv_at_100"] for r in mine]),
                " / ".join(f"{c:.1f}" if c != "" else "never" for c in reached),
                _mean_sd([r["wall_at_40"] for r in mine], 0),
                _mean_sd([r["wall_at_100"] for r in mine], 0),
                " / ".join(str(r["complete_at_100"]) for r in mine),
                " / ".join(str(r["trials"]) for r in mine),
            ]
        )
    hits = sum(h for h, _ in early)
    sampled = sum(n for _, n in early)
    return (
        "\n\n".join(
            [
                "# Experiment 6: multi-fidelity trials",
                f"Pool seeds {', '.join(map(str, seeds))}; budget {budget} full-trial equivalents; "
                "test hypervolume of the dev Pareto set, relative to the full-fidelity search's "
                "final one on the same pool (mean ± sd over pools).",
                md_table(
                    [
                        "search",
                        f"test HV at 40 % ({0.4 * budget:g})",
                        f"test HV at 100 % ({budget})",
                        "cost to reach 1.0 (per pool)",
                        "wall s at 40 %",
                        "wall s at 100 %",
                        "full-fidelity trials at 100 % (per pool)",
                        "trials started (per pool)",
                    ],
                    table,
                ),
                f"First-rung-pruned trials of `tpe-mf` that would have reached its final dev "
                f"Pareto set, scored on every dev document: {hits} of {sampled} sampled "
                f"({', '.join(f'{h}/{n}' for h, n in early)} per pool).",
                f"Measured in {wall:.0f} s on this machine.",
            ]
        )
        + "\n"
    )


def plot(curves: dict[str, list[list[dict[str, float]]]], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [budget * i / 100 for i in range(101)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, per_seed in curves.items():
        if not per_seed:
            continue
        ys = [[at_cost(points, c)["hv"] for c in grid] for points in per_seed]
        mean = [statistics.fmean(col) for col in zip(*ys)]
        ax.plot(grid, mean, label=LABELS[key])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axvline(0.4 * budget, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("cost (full-trial equivalents of dev documents scored)")
    ax.set_ylabel("test hypervolume / full search's final")
    ax.set_title("Multi-fidelity vs full-fidelity TPE (mean over pools)")
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
