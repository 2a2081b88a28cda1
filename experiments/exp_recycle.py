"""Experiment 1: recycling (Khalifa et al. 2024): a searched merge against the usual merges.

    python experiments/exp_recycle.py [--seeds 0 1 2] [--out experiments/results]

On each demo pool (`--size small`, pool seeds 0, 1, 2; the 9 full checkpoints), every
model below is chosen on the dev split and scored on the TEST split:

- best single checkpoint, uniform soup, greedy soup (Wortsman et al. 2022): recycler's
  own baselines (searchkit run `baselines`);
- task arithmetic (λ), TIES (density, λ) and DARE-TIES (density, λ) over all 9 checkpoints
  with equal weights, their hyperparameters tuned by TPE on the dev macro-average with the
  search's budget (the search budget, `--budget`, default 50 evaluations each), the best on dev kept;
- the searched merge: recycler's default sampler (TPE, multi-objective, the knee of the
  Pareto set and its best member by dev macro-average), with and without recycler's baseline
  seeds, and CMA-ES on the macro-average, as in the paper.

The searches optimise the four trained skills; `sort` is held out of every search and
every choice. Also reported: how many checkpoints get a weight above 0.01 in the Pareto
set's members. Writes experiments/results/exp_recycle.{csv,md,png}.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from expkit import HELD_OUT, TRAINED, Clock, md_table, one_thread, pm, save_figure, write_rows_csv
from searchkit import (
    RUNS,
    SETTINGS,
    RecipeScores,
    checkpoint_weights,
    dev_macro,
    ensure_run,
    ensure_tuned,
    experiment_args,
)

from recycler.search.analysis import analyse

COLS = (*TRAINED, "mean4", HELD_OUT)
ACTIVE = 0.01  # a checkpoint "takes part" in a merge above this weight
# (label, kind): in the table's order.
MODELS = (
    ("best single checkpoint", "single"),
    ("uniform soup", "uniform"),
    ("greedy soup", "greedy"),
    ("task arithmetic, λ tuned", "tuned:task_arithmetic"),
    ("TIES, density + λ tuned", "tuned:ties"),
    ("DARE-TIES, density + λ tuned", "tuned:dare_ties"),
    ("search: TPE, Pareto knee", "knee:tpe"),
    ("search: TPE, best dev mean on the front", "best:tpe"),
    ("search: TPE + baseline seeds, knee", "knee:tpe-seeded"),
    ("search: TPE + baseline seeds, best dev mean", "best:tpe-seeded"),
    ("search: CMA-ES on the mean (paper)", "best:cmaes"),
    ("search: TPE, task arithmetic (weights + λ), knee", "knee:tpe-ta"),
    ("search: TPE, task arithmetic (weights + λ), best dev mean", "best:tpe-ta"),
)


def chosen(kind: str, seed: int, say: Clock) -> tuple[dict[str, Any], int, dict[str, float] | None]:
    """(recipe, evaluations spent, checkpoint weights) of the model this kind picks on dev."""
    if kind.startswith("tuned:"):
        return ensure_tuned(kind.split(":", 1)[1], seed, say)
    if kind in ("single", "uniform", "greedy"):
        view = ensure_run(RUNS["baselines"], seed, say)
        done = [r for r in view.complete]
        if kind == "single":
            pick = max(
                (r for r in done if (r.baseline or "").startswith("single:")),
                key=lambda r: dev_macro(view, r),
            )
            spent = sum(1 for r in done if (r.baseline or "").startswith("single:"))
        elif kind == "uniform":
            pick, spent = next(r for r in done if r.baseline == "uniform"), 1
        else:
            number = view.greedy_soup
            pick = next(r for r in done if r.number == number)
            spent = len(done) - 1  # every single and greedy step, not the uniform soup
        assert pick.recipe is not None
        return pick.recipe, spent, checkpoint_weights(pick)
    how, key = kind.split(":", 1)
    view = ensure_run(RUNS[key], seed, say)
    summary = analyse(view, "dev")
    members = [m.record for m in summary.members]
    if how == "knee":
        pick = next(r for r in members if r.number == summary.knee)
    else:
        pick = max(members, key=lambda r: (dev_macro(view, r), -r.number))
    assert pick.recipe is not None
    return pick.recipe, len(view.complete), checkpoint_weights(pick)


def active_counts(key: str, seed: int, say: Clock) -> list[int]:
    """For each member of the run's Pareto set (dev): checkpoints with weight > ACTIVE."""
    view = ensure_run(RUNS[key], seed, say)
    return [
        sum(w > ACTIVE for w in checkpoint_weights(m.record).values())
        for m in analyse(view, "dev").members
    ]


def run_seed(seed: int, say: Clock) -> list[dict[str, Any]]:
    scores = RecipeScores(seed, say)
    rows = []
    for label, kind in MODELS:
        recipe, spent, weights = chosen(kind, seed, say)
        test = scores.score(recipe, "test")
        dev = scores.score(recipe, "dev")
        active = sum(w > ACTIVE for w in weights.values()) if weights else len(recipe["models"])
        rows.append(
            {
                "seed": seed,
                "model": label,
                "kind": kind,
                "evaluations": spent,
                "active": active,
                "dev_mean4": dev["mean4"],
                **{c: test[c] for c in COLS},
            }
        )
        say(f"seed {seed}: {label}: test mean4 {test['mean4']:.3f}, sort {test[HELD_OUT]:.3f}")
    return rows


def _by(rows: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _paired(rows: list[dict[str, Any]], kind: str, ref: str, col: str) -> list[float]:
    refs = {r["seed"]: r[col] for r in _by(rows, kind=ref)}
    return [r[col] - refs[r["seed"]] for r in _by(rows, kind=kind) if r["seed"] in refs]


def _delta(vals: Sequence[float]) -> str:
    return f"{100 * statistics.fmean(vals):+.1f} ({sum(v > 0 for v in vals)}/{len(vals)})"


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for label, kind in MODELS:
        sel = _by(rows, kind=kind)
        if not sel:
            continue
        body.append(
            [
                label,
                f"{statistics.fmean(r['evaluations'] for r in sel):.0f}",
                f"{statistics.fmean(r['active'] for r in sel):.1f}",
                *(pm([r[c] for r in sel]) for c in COLS),
                _delta(_paired(rows, kind, "single", "mean4")) if kind != "single" else "",
                _delta(_paired(rows, kind, "uniform", "mean4")) if kind != "uniform" else "",
            ]
        )
    header = [
        "model (chosen on dev)",
        "dev evaluations",
        "ckpts > 0.01",
        *TRAINED,
        "mean (4)",
        "sort (held out)",
        "Δ mean (4) vs best single (seeds higher)",
        "Δ vs uniform soup",
    ]
    return md_table(header, body)


def active_table(seeds: Sequence[int], say: Clock) -> str:
    body = []
    for key in ("tpe", "tpe-seeded", "tpe-macro", "tpe-ta", "nsga2", "random", "gp"):
        per_seed = [active_counts(key, s, say) for s in seeds]
        counts = [c for cs in per_seed for c in cs]
        n = len(ensure_run(RUNS[key], seeds[0], say).complete[0].weights)
        body.append(
            [
                key,
                f"{statistics.fmean(len(cs) for cs in per_seed):.1f}",
                f"{statistics.fmean(counts):.1f}",
                min(counts),
                max(counts),
                f"{100 * sum(c == n for c in counts) / len(counts):.0f} %",
            ]
        )
    return md_table(
        [
            "run",
            "front members (mean over seeds)",
            "ckpts > 0.01 per member, mean",
            "min",
            "max",
            "members using every checkpoint",
        ],
        body,
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    shown = [(label, kind) for label, kind in MODELS if _by(rows, kind=kind)]
    for i, (_, kind) in enumerate(shown):
        sel = _by(rows, kind=kind)
        for r in sel:
            ax.scatter(100 * r["mean4"], i, color="C0", s=18)
            ax.scatter(100 * r[HELD_OUT], i, color="C3", s=18, marker="x")
        ax.scatter(100 * statistics.fmean(r["mean4"] for r in sel), i, color="C0", s=80, marker="|")
    ax.set_yticks(range(len(shown)), [label for label, _ in shown])
    ax.invert_yaxis()
    ax.set_xlabel(
        "test accuracy, %: dots, mean of the 4 trained skills per seed (bar: their mean); x, held-out sort"
    )
    ax.set_title("Experiment 1: models chosen on dev, scored on test")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = experiment_args(__doc__, argv)
    say = Clock()
    rows: list[dict[str, Any]] = []
    with one_thread():
        for seed in args.seeds:
            rows += run_seed(seed, say)
        active = active_table(args.seeds, say)
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(rows, args.out / "exp_recycle.csv")
    plot(rows, args.out / "exp_recycle.png")
    (args.out / "exp_recycle.md").write_text(
        "\n".join(
            [
                "# Experiment 1: recycling checkpoints, searched merge vs the usual merges",
                "",
                f"Demo pool `--size {SETTINGS.size}`, pool seeds {args.seeds}, its full checkpoints. Every model is chosen on the "
                f"dev split and scored on the TEST split; accuracy in percent, mean ± sample std over the seeds; "
                f"**mean (4)** = the four trained skills (what the searches optimise); `sort` is held out of every search "
                f"and every choice. Searches and tuned methods: {SETTINGS.budget} dev evaluations each. Δ is paired per seed.",
                "",
                table(rows),
                "",
                f"Checkpoints with weight > {ACTIVE} in the members of each search's Pareto set (dev), over all seeds:",
                "",
                active,
                "",
                "![recycling](exp_recycle.png)",
                "",
                f"Measured: {say.elapsed():.0f} s wall for this script (searches already run are read back from their "
                f"storage). Command: `{' '.join(sys.argv)}`.",
                "",
            ]
        )
    )
    say(f"wrote {args.out / 'exp_recycle.md'}, .csv, .png")
    print((args.out / "exp_recycle.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
