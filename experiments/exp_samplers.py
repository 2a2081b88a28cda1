"""Experiment 4: samplers (hypervolume against trials) and weight granularity.

    python experiments/exp_samplers.py [--seeds 0 1 2] [--out experiments/results]

The same search on each demo pool (`--size small`, pool seeds 0, 1, 2, which also seed
the samplers; the 9 full checkpoints, simplex weights, the four trained skills as
objectives, no baseline seeds, the search budget, `--budget`, default 50 trials) with each of recycler's samplers:
tpe, nsga2, gp and random on the Pareto set, cmaes on the macro-average (scalarised; its
trials' four skills are kept, so its hypervolume is measured the same way), plus tpe on
the macro-average, and tpe with weights per layer group (`layers:2`: two layer groups and
the rest, 27 weights instead of 9).

Hypervolume on dev after k trials, against one reference point per pool (the worst value
of each skill over every trial of every run on that pool), divided by the hypervolume of
all those trials together (1.0 = the best front any run found). Also: the best dev
mean of the trained skills, and the test scores of the member with that best dev mean.
Writes experiments/results/exp_samplers.{csv,md,png}.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from expkit import HELD_OUT, Clock, md_table, one_thread, pm, save_figure, write_rows_csv
from searchkit import RUNS, SETTINGS, RecipeScores, dev_macro, ensure_run, experiment_args

from recycler.search import front as pareto
from recycler.search.study import StudyView

KEYS = ("tpe", "nsga2", "gp", "random", "cmaes", "tpe-macro", "tpe-layers2")
LABELS = {
    "tpe": "tpe",
    "nsga2": "nsga2",
    "gp": "gp",
    "random": "random",
    "cmaes": "cmaes (on the mean)",
    "tpe-macro": "tpe (on the mean)",
    "tpe-layers2": "tpe, layers:2",
}
CHECKPOINTS = (10, 20, 30, 40, 50)


def budget_trials(view: StudyView) -> list[Any]:
    """The trials that count toward the budget, in order: not those a killed run left
    behind (failed as stale or interrupted and run again by the resumed search)."""
    return [
        r
        for r in sorted(view.trials, key=lambda r: r.number)
        if not (r.state == "FAIL" and (r.fail_reason or "").startswith(("stale", "interrupted")))
    ]


def trajectory(view: StudyView) -> list[list[float] | None]:
    """Per trial in budget order: its dev vector, or None for a failed trial."""
    return [r.vector_dev if r.state == "COMPLETE" else None for r in budget_trials(view)]


def hv_curve(traj: list[list[float] | None], ref: np.ndarray, scale: float) -> list[float]:
    out, seen = [], []
    for v in traj:
        if v is not None:
            seen.append(v)
        out.append(
            pareto.hypervolume(np.asarray(seen), ref, [True] * len(ref)) / scale if seen else 0.0
        )
    return out


def run_seed(seed: int, say: Clock) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    views = {k: ensure_run(RUNS[k], seed, say) for k in KEYS}
    trajs = {k: trajectory(v) for k, v in views.items()}
    every = np.asarray([v for t in trajs.values() for v in t if v is not None])
    maximize = [True] * every.shape[1]
    ref = pareto.nadir(every, maximize)
    scale = pareto.hypervolume(every, ref, maximize)
    scores = RecipeScores(seed, say)
    rows, curves = [], {}
    for key, view in views.items():
        curve = hv_curve(trajs[key], ref, scale)
        curves[key] = curve
        best = max(view.complete, key=lambda r: (dev_macro(view, r), -r.number))
        assert best.recipe is not None
        test = scores.score(best.recipe, "test")
        rows.append(
            {
                "seed": seed,
                "run": key,
                "trials": len(budget_trials(view)),
                "failed": sum(r.state == "FAIL" for r in budget_trials(view)),
                **{f"hv@{k}": curve[min(k, len(curve)) - 1] for k in CHECKPOINTS},
                "best_dev_mean4": dev_macro(view, best),
                "test_mean4": test["mean4"],
                "test_sort": test[HELD_OUT],
                "trial_of_best": best.number,
            }
        )
        say(
            f"seed {seed}: {key}: HV@{SETTINGS.budget} {curve[-1]:.3f}, best dev mean {rows[-1]['best_dev_mean4']:.3f}"
        )
    return rows, curves


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for key in KEYS:
        sel = [r for r in rows if r["run"] == key]
        body.append(
            [
                LABELS[key],
                *(pm([r[f"hv@{k}"] for r in sel], 1, 3) for k in CHECKPOINTS),
                pm([r["best_dev_mean4"] for r in sel], 100, 1),
                pm([r["test_mean4"] for r in sel], 100, 1),
                pm([r["test_sort"] for r in sel], 100, 1),
                f"{statistics.fmean(r['trial_of_best'] for r in sel):.0f}",
            ]
        )
    return md_table(
        [
            "sampler",
            *(f"HV @ {k}" for k in CHECKPOINTS),
            "best dev mean (4)",
            "its test mean (4)",
            "its test sort (held out)",
            "trial that found it",
        ],
        body,
    )


def ranks(rows: list[dict[str, Any]]) -> str:
    """Rank of each sampler by final hypervolume, per seed (1 = best)."""
    seeds = sorted({r["seed"] for r in rows})
    body = []
    per_seed = {
        s: sorted((r for r in rows if r["seed"] == s), key=lambda r: -r[f"hv@{CHECKPOINTS[-1]}"])
        for s in seeds
    }
    for key in KEYS:
        rk = [next(i + 1 for i, r in enumerate(per_seed[s]) if r["run"] == key) for s in seeds]
        body.append([LABELS[key], *rk, f"{statistics.fmean(rk):.1f}"])
    return md_table(["sampler", *(f"seed {s}" for s in seeds), "mean rank"], body)


def plot(curves: dict[int, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, key in enumerate(KEYS):
        arr = np.asarray([c[key] for c in curves.values()])
        x = np.arange(1, arr.shape[1] + 1)
        mean, lo, hi = arr.mean(0), arr.min(0), arr.max(0)
        style = "--" if key in ("cmaes", "tpe-macro") else (":" if key == "tpe-layers2" else "-")
        ax.plot(x, mean, style, color=f"C{i}", label=LABELS[key])
        ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.08)
    ax.set_xlabel("trials")
    ax.set_ylabel("dev hypervolume / best known")
    ax.set_title("Experiment 4: samplers (mean over seeds; band: min to max)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = experiment_args(__doc__, argv)
    say = Clock()
    rows: list[dict[str, Any]] = []
    curves: dict[int, dict[str, list[float]]] = {}
    with one_thread():
        for seed in args.seeds:
            seed_rows, curves[seed] = run_seed(seed, say)
            rows += seed_rows
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(rows, args.out / "exp_samplers.csv")
    plot(curves, args.out / "exp_samplers.png")
    (args.out / "exp_samplers.md").write_text(
        "\n".join(
            [
                "# Experiment 4: samplers and weight granularity",
                "",
                f"Demo pool `--size {SETTINGS.size}`, pool (= sampler) seeds {args.seeds}; {SETTINGS.budget} trials per run, no baseline "
                "seeds; objectives: the four trained skills on dev. **HV @ k**: hypervolume of the first k trials against "
                "the pool's worst value of each skill over all runs, divided by the hypervolume of every run's trials "
                "together; mean ± sample std over seeds. Accuracies in percent; the test columns score the run's member with "
                "the best dev mean.",
                "",
                table(rows),
                "",
                "Rank by final hypervolume, per seed:",
                "",
                ranks(rows),
                "",
                "![samplers](exp_samplers.png)",
                "",
                f"Measured: {say.elapsed():.0f} s wall for this script (runs already stored are read back). "
                f"Command: `{' '.join(sys.argv)}`.",
                "",
            ]
        )
    )
    say(f"wrote {args.out / 'exp_samplers.md'}, .csv, .png")
    print((args.out / "exp_samplers.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
