"""Experiment 5: one objective or several: does the multi-objective front contain, or
dominate, the optimum of the single macro-average objective?

    python experiments/exp_objectives.py [--seeds 0 1 2] [--out experiments/results]

Per demo pool (`--size small`, pool seeds 0, 1, 2), same budget (the search budget, `--budget`, default 50 trials),
same 9 checkpoints and simplex weights, no baseline seeds:

- **front**: TPE on the four trained skills as four objectives (recycler's default);
  its Pareto set on dev;
- **macro optimum**: the best dev mean found by the same TPE on the mean of the four
  skills as one objective (`search.objective: macro_average`), and by CMA-ES on that mean
  (the recycling paper's setting).

Questions, on dev (what the searches saw): is the macro optimum dominated by a member of
the front (better or equal on all four skills, better on one)? does the front hold a
member with a dev mean at least as high? And on test: the front's best-dev-mean member
and its knee against the macro optimum, on the trained skills and on the held-out `sort`.
Writes experiments/results/exp_objectives.{csv,md,png}.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from expkit import HELD_OUT, Clock, md_table, one_thread, pm, save_figure, write_rows_csv
from searchkit import RUNS, SETTINGS, RecipeScores, dev_macro, ensure_run, experiment_args

from recycler.search import front as pareto
from recycler.search.analysis import analyse

SINGLE = ("tpe-macro", "cmaes")
LABELS = {"tpe-macro": "TPE on the mean", "cmaes": "CMA-ES on the mean"}


def run_seed(seed: int, say: Clock) -> list[dict[str, Any]]:
    scores = RecipeScores(seed, say)
    view = ensure_run(RUNS["tpe"], seed, say)
    summary = analyse(view, "dev")
    members = [m.record for m in summary.members]
    maximize = [True] * len(view.objectives)
    best_front = max(members, key=lambda r: (dev_macro(view, r), -r.number))
    knee = next(r for r in members if r.number == summary.knee)
    rows = []
    for key in SINGLE:
        single = ensure_run(RUNS[key], seed, say)
        opt = max(single.complete, key=lambda r: (dev_macro(single, r), -r.number))
        assert opt.vector_dev is not None and opt.recipe is not None
        dominated_by = [
            m.number for m in members if pareto.dominates(m.vector_dev, opt.vector_dev, maximize)
        ]  # type: ignore[arg-type]
        dominates = [
            m.number for m in members if pareto.dominates(opt.vector_dev, m.vector_dev, maximize)
        ]  # type: ignore[arg-type]
        t_opt, t_best, t_knee = (scores.score(r.recipe, "test") for r in (opt, best_front, knee))  # type: ignore[arg-type]
        rows.append(
            {
                "seed": seed,
                "single": key,
                "front_size": len(members),
                "opt_dev_mean4": dev_macro(single, opt),
                "front_best_dev_mean4": dev_macro(view, best_front),
                "knee_dev_mean4": dev_macro(view, knee),
                "opt_dominated_by_front": len(dominated_by),
                "front_members_opt_dominates": len(dominates),
                "opt_test_mean4": t_opt["mean4"],
                "front_best_test_mean4": t_best["mean4"],
                "knee_test_mean4": t_knee["mean4"],
                "opt_test_sort": t_opt[HELD_OUT],
                "front_best_test_sort": t_best[HELD_OUT],
                "knee_test_sort": t_knee[HELD_OUT],
            }
        )
        say(
            f"seed {seed}: {key} optimum dev {rows[-1]['opt_dev_mean4']:.3f} vs front best "
            f"{rows[-1]['front_best_dev_mean4']:.3f}; dominated by {len(dominated_by)} member(s)"
        )
    return rows


def per_seed_table(rows: list[dict[str, Any]]) -> str:
    body = [
        [
            r["seed"],
            LABELS[r["single"]],
            f"{100 * r['opt_dev_mean4']:.1f}",
            f"{100 * r['front_best_dev_mean4']:.1f}",
            r["front_size"],
            r["opt_dominated_by_front"],
            r["front_members_opt_dominates"],
        ]
        for r in rows
    ]
    return md_table(
        [
            "seed",
            "single objective",
            "its optimum, dev mean (4)",
            "front's best dev mean (4)",
            "front members",
            "members dominating the optimum",
            "members the optimum dominates",
        ],
        body,
    )


def summary_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for key in SINGLE:
        sel = [r for r in rows if r["single"] == key]
        for label, prefix in (
            (f"{LABELS[key]}: its optimum", "opt"),
            ("TPE front: best dev mean", "front_best"),
            ("TPE front: knee", "knee"),
        ):
            delta = [r[f"{prefix}_test_mean4"] - r["opt_test_mean4"] for r in sel]
            body.append(
                [
                    label,
                    pm([r[f"{prefix}_dev_mean4"] for r in sel]),
                    pm([r[f"{prefix}_test_mean4"] for r in sel]),
                    pm([r[f"{prefix}_test_sort"] for r in sel]),
                    ""
                    if prefix == "opt"
                    else f"{100 * statistics.fmean(delta):+.1f} ({sum(d > 0 for d in delta)}/{len(delta)})",
                ]
            )
    return md_table(
        [
            "model",
            "dev mean (4)",
            "test mean (4)",
            "test sort (held out)",
            "Δ test mean (4) vs the optimum (seeds higher)",
        ],
        body,
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (prefix, label) in enumerate(
        (("opt", "macro optimum"), ("front_best", "front: best dev mean"), ("knee", "front: knee"))
    ):
        for j, key in enumerate(SINGLE):
            sel = [r for r in rows if r["single"] == key]
            if prefix != "opt" and j > 0:
                continue  # the front's members do not depend on which single-objective run they face
            xs = [100 * r[f"{prefix}_dev_mean4"] for r in sel]
            ys = [100 * r[f"{prefix}_test_mean4"] for r in sel]
            name = f"{label} ({LABELS[key]})" if prefix == "opt" else label
            ax.scatter(
                xs,
                ys,
                marker="osx^"[i + j if prefix == "opt" else i + 1],
                color=f"C{i * 2 + j}",
                label=name,
            )
    ax.set_xlabel("dev mean (4), %")
    ax.set_ylabel("test mean (4), %")
    ax.set_title("Experiment 5: single macro-average objective vs the Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = experiment_args(__doc__, argv)
    say = Clock()
    rows: list[dict[str, Any]] = []
    with one_thread():
        for seed in args.seeds:
            rows += run_seed(seed, say)
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(rows, args.out / "exp_objectives.csv")
    plot(rows, args.out / "exp_objectives.png")
    (args.out / "exp_objectives.md").write_text(
        "\n".join(
            [
                "# Experiment 5: one objective (the mean) or four (the Pareto front)?",
                "",
                f"Demo pool `--size {SETTINGS.size}`, pool (= sampler) seeds {args.seeds}; {SETTINGS.budget} trials per run, no baseline seeds, "
                "9 checkpoints, simplex weights. Front: TPE on the four trained skills; the single objective: their mean. "
                "Accuracies in percent; mean ± sample std over seeds; Δ paired per seed.",
                "",
                per_seed_table(rows),
                "",
                summary_table(rows),
                "",
                "![objectives](exp_objectives.png)",
                "",
                f"Measured: {say.elapsed():.0f} s wall for this script (runs already stored are read back). "
                f"Command: `{' '.join(sys.argv)}`.",
                "",
            ]
        )
    )
    say(f"wrote {args.out / 'exp_objectives.md'}, .csv, .png")
    print((args.out / "exp_objectives.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
