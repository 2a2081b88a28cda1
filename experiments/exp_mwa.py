"""Experiment 2: metric-weighted averaging (MWA, Yu & Choi 2025) on the demo pool.

    python experiments/exp_mwa.py [--seeds 0 1 2] [--size small] [--workdir experiments/_pools]
                                  [--penalties 0 0.25 0.5 0.75 1 1.5 2 4 8] [--out experiments/results]

For each pool seed (a `recycler zoo build --size SIZE --seed N`, cached under the
work dir), two sets of checkpoints of ONE training run are merged:

- `lora`: the 3 LoRA adapter checkpoints (read as base + B·A delta, so the merge
  averages the merged deltas), and
- `full`: the full checkpoints of the run with the most intermediate checkpoints.

Weights (recycler.merge.weights.mwa_weights): w_i ∝ g_i^p, normalised, with
g_i = 1 / (last logged training loss) or g_i = global step, for every penalty
factor p of the sweep (p = 0 is the uniform average). Baselines: the uniform
average and the run's last checkpoint (each member is scored too). Every merge is
recycler's `linear` (normalize: true) in float32, scored on the TEST split of the
zoo's tasks by the zoo's own in-memory scorer. Nothing here is random beyond the
pool seed; repeated runs give the same numbers.

Writes experiments/results/exp_mwa.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recycler.merge.weights import MwaMetric

sys.path.insert(0, str(Path(__file__).resolve().parent))

from expkit import (  # the helper beside this script
    DEFAULT_WORKDIR,
    HELD_OUT,
    RESULTS,
    TRAINED,
    Clock,
    TestScorer,
    ensure_pool,
    linear_merge,
    machine_note,
    md_table,
    mean_std,
    one_thread,
    pm,
    runs_in,
    save_figure,
)

PENALTIES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)
METRICS: tuple[MwaMetric, ...] = ("loss", "step")
# The paper's recommended settings (METHODS.md): p ≈ 0.5–0.8 for loss, ≈ 1.0–1.05 for steps.
PAPER_P = {"loss": (0.5, 0.8), "step": (1.0, 1.05)}
PAPER_POINT = {"loss": 0.75, "step": 1.0}
SCORE_COLS = (*TRAINED, HELD_OUT, "mean4", "own_mean", "zoo_mean")
# A difference smaller than this (accuracy, mean of the 4 trained skills) is
# within a few questions out of 800 and not called a win or a loss.
NOISE = 0.005


def skills_of(mixture: dict[str, float]) -> list[str]:
    """The skills a run trains on (replayed ones at small weight left out)."""
    return [s for s, w in mixture.items() if w >= 0.5]


def score_set(
    seed: int,
    kind: str,
    run: str,
    paths: list[Path],
    base: Path,
    own: list[str],
    scorer: TestScorer,
    penalties: Sequence[float],
    say: Clock,
) -> list[dict[str, Any]]:
    """Every member, the last checkpoint, the uniform average and the MWA sweep of one checkpoint set."""
    from recycler.merge.weights import mwa_weights, uniform_weights
    from recycler.pool import Pool

    rows: list[dict[str, Any]] = []
    pool = Pool.from_paths(paths, base=base)
    states = [c.trainer_state() for c in pool.checkpoints]
    pool.close()
    losses = [s.loss if s else None for s in states]
    steps = [s.step if s else None for s in states]
    say(f"seed {seed} {kind} ({run}): {len(paths)} checkpoints, steps {steps}, losses {losses}")
    cache: dict[tuple[float, ...], dict[str, float]] = {}

    def scored(weights: Sequence[float]) -> dict[str, float]:
        key = tuple(round(w, 12) for w in weights)
        if key not in cache:
            cache[key] = scorer.score(linear_merge(paths, weights, base), own)
        return cache[key]

    def add(
        method: str,
        weights: Sequence[float],
        metric: str = "",
        p: float | None = None,
        member: str = "",
    ) -> None:
        rows.append(
            {
                "seed": seed,
                "set": kind,
                "run": run,
                "n": len(paths),
                "method": method,
                "metric": metric,
                "p": "" if p is None else p,
                "member": member,
                "weights": json.dumps([round(w, 4) for w in weights]),
                "own_skills": "+".join(own),
                **scored(weights),
            }
        )

    n = len(paths)
    for i, path in enumerate(paths):
        one_hot = [1.0 if j == i else 0.0 for j in range(n)]
        add("member", one_hot, member=path.name)
    add("last", [0.0] * (n - 1) + [1.0], member=paths[-1].name)
    add("uniform", uniform_weights(n))
    pool = Pool.from_paths(paths, base=base)
    try:
        for metric in METRICS:
            for p in penalties:
                add("mwa", mwa_weights(pool.checkpoints, metric, p), metric, p)
    finally:
        pool.close()
    best = max(r["mean4"] for r in rows if r["seed"] == seed and r["set"] == kind)
    say(f"seed {seed} {kind}: {len(cache)} merges scored (best mean4 {best:.3f})")
    return rows


def run_seed(seed: int, args: argparse.Namespace, say: Clock) -> list[dict[str, Any]]:
    from recycler.zoo.spec import get_spec

    spec = get_spec(args.size)
    zoo = ensure_pool(args.workdir, args.size, seed, say)
    base = zoo / "base"
    adapters = runs_in(zoo, "adapters")
    full = runs_in(zoo, "checkpoints")
    full_run = max(full, key=lambda r: len(full[r]))  # ties: the first in name order
    mixtures = {r.name: r.mixture for r in spec.runs} | {spec.lora.name: spec.lora.mixture}
    lora_run = next(iter(adapters))
    sets = [("lora", lora_run, adapters[lora_run]), ("full", full_run, full[full_run])]

    scorer = TestScorer(zoo)
    rows: list[dict[str, Any]] = []
    for kind, run, paths in sets:
        rows += score_set(
            seed, kind, run, paths, base, skills_of(mixtures[run]), scorer, args.penalties, say
        )
    return rows


# ---------------------------------------------------------------- reporting


def _select(rows: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _by_seed(rows: list[dict[str, Any]], col: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[col]) for r in rows}


def _delta(
    rows: list[dict[str, Any]], ref: list[dict[str, Any]], col: str
) -> tuple[list[float], int]:
    a, b = _by_seed(rows, col), _by_seed(ref, col)
    d = [a[s] - b[s] for s in sorted(a) if s in b]
    return d, sum(x > 0 for x in d)


def verdict(rows: list[dict[str, Any]], kind: str, penalties: Sequence[float]) -> list[str]:
    """Plain statements, from fixed rules, about the paper's two claims on this checkpoint set."""
    uni = _select(rows, set=kind, method="uniform")
    last = _select(rows, set=kind, method="last")
    n_seeds = len(uni)
    out = []
    for col, what in (
        ("mean4", "the mean of the 4 trained skills"),
        ("own_mean", f"the run's own skills ({uni[0]['own_skills']})"),
    ):
        out.append(f"On {what}:")
        for metric in METRICS:
            p0 = PAPER_POINT[metric]
            if p0 not in penalties:
                continue
            at = _select(rows, set=kind, method="mwa", metric=metric, p=p0)
            d, wins = _delta(at, uni, col)
            m, s = mean_std(d)
            dl, wins_l = _delta(at, last, col)
            if m >= NOISE and wins == n_seeds:
                word = "beats"
            elif m <= -NOISE:
                word = "is worse than"
            else:
                word = "does not beat"
            out.append(
                f"- **{metric}, p = {p0:g}** (paper's setting) {word} the uniform average: "
                f"Δ {m * 100:+.2f} ± {s * 100:.2f} pp, higher in {wins}/{n_seeds} seeds; "
                f"vs the last checkpoint {mean_std(dl)[0] * 100:+.2f} pp (higher in {wins_l}/{n_seeds})."
            )
            curve = [
                (
                    p,
                    mean_std(
                        [r[col] for r in _select(rows, set=kind, method="mwa", metric=metric, p=p)]
                    )[0],
                )
                for p in penalties
            ]
            best_p, best = max(curve, key=lambda t: t[1])
            spread = best - min(v for _, v in curve)
            lo, hi = PAPER_P[metric]
            where = "inside" if lo - 1e-9 <= best_p <= hi + 1e-9 else "outside"
            if spread < NOISE - 1e-9:
                out.append(
                    f"  Best p: none to speak of; the curve over p ∈ [{min(penalties):g}, {max(penalties):g}] spans only "
                    f"{spread * 100:.2f} pp (argmax p = {best_p:g})."
                )
            else:
                out.append(
                    f"  Best p (seed mean, picked on test, so optimistic) = {best_p:g}, {where} the paper's "
                    f"{lo:g}–{hi:g}; the curve spans {spread * 100:.2f} pp."
                )
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = [
        "seed",
        "set",
        "run",
        "n",
        "method",
        "metric",
        "p",
        "member",
        "weights",
        "own_skills",
        *SCORE_COLS,
    ]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: (f"{r[k]:.4f}" if isinstance(r[k], float) and k in SCORE_COLS else r[k])
                    for k in cols
                }
            )


def summary_table(rows: list[dict[str, Any]], kind: str, penalties: Sequence[float]) -> str:
    uni = _select(rows, set=kind, method="uniform")
    lines: list[tuple[str, list[dict[str, Any]]]] = [
        ("last checkpoint", _select(rows, set=kind, method="last"))
    ]
    members = sorted({r["member"] for r in _select(rows, set=kind, method="member")})
    lines += [
        (f"member {m}", _select(rows, set=kind, method="member", member=m)) for m in members[:-1]
    ]
    lines.append(("uniform average", uni))
    for metric in METRICS:
        lines += [
            (f"MWA {metric}, p = {p:g}", _select(rows, set=kind, method="mwa", metric=metric, p=p))
            for p in penalties
            if p > 0
        ]
    body = []
    for label, sel in lines:
        d, wins = _delta(sel, uni, "mean4")
        body.append(
            [
                label,
                *(pm([r[c] for r in sel]) for c in (*TRAINED, "mean4", "own_mean", HELD_OUT)),
                f"{mean_std(d)[0] * 100:+.2f} ({wins}/{len(d)})",
            ]
        )
    own = uni[0]["own_skills"]
    header = [
        "model",
        *TRAINED,
        "**mean (4)**",
        f"run's skills ({own})",
        "sort (held out)",
        "Δ mean vs uniform (seeds higher)",
    ]
    return md_table(header, body)


def weights_table(
    rows: list[dict[str, Any]], kind: str, seed: int, penalties: Sequence[float]
) -> str:
    body = []
    for metric in METRICS:
        for p in penalties:
            sel = _select(rows, set=kind, method="mwa", metric=metric, p=p, seed=seed)
            if sel:
                body.append([metric, f"{p:g}", sel[0]["weights"]])
    return md_table(["metric", "p", "weights (oldest → newest)"], body)


def plot(rows: list[dict[str, Any]], penalties: Sequence[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["set"] for r in rows))
    cols = [
        ("mean4", "mean test acc, 4 trained skills"),
        ("own_mean", "mean test acc, the run's own skills"),
    ]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 4.2 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        run = _select(rows, set=kind)[0]["run"]
        for j, (col, label) in enumerate(cols):
            ax = axes[i][j]
            for metric, color in zip(METRICS, ("tab:blue", "tab:orange")):
                ms = [
                    mean_std(
                        [r[col] for r in _select(rows, set=kind, method="mwa", metric=metric, p=p)]
                    )
                    for p in penalties
                ]
                mean = [m for m, _ in ms]
                std = [s for _, s in ms]
                ax.errorbar(
                    penalties,
                    mean,
                    yerr=std,
                    marker="o",
                    capsize=3,
                    color=color,
                    label=f"MWA by {metric}",
                )
            for method, style, color in (("uniform", "--", "black"), ("last", ":", "tab:red")):
                m, s = mean_std([r[col] for r in _select(rows, set=kind, method=method)])
                ax.axhline(m, linestyle=style, color=color, label=f"{method} ({m:.3f} ± {s:.3f})")
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xticks(list(penalties))
            ax.set_xticklabels([f"{p:g}" for p in penalties])
            ax.set_xlabel("penalty factor p  (w ∝ g^p)")
            ax.set_ylabel(label)
            ax.set_title(f"{kind}: {run} ({_select(rows, set=kind)[0]['n']} checkpoints)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle(
        f"Metric-weighted averaging on the demo pool (test split, mean ± std over {n_seeds} pool seeds)"
    )
    save_figure(fig, path)


def write_md(
    rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float, built: int, path: Path
) -> None:
    seeds = sorted({int(r["seed"]) for r in rows})
    parts = [
        "# Experiment 2: metric-weighted averaging (Yu & Choi 2025)",
        "",
        f"Demo pool `--size {args.size}`, pool seeds {seeds}; TEST split (200 questions per skill for small); "
        "accuracy in percent, mean ± sample std over the pool seeds. **mean (4)** is the mean over the four "
        "fine-tuned skills (inc, dec, rev, rot); `sort` is the held-out skill, reported apart. Δ is paired "
        "per seed against the uniform average.",
        "",
        "Weights: w_i ∝ g_i^p, normalised (recycler.merge.weights.mwa_weights), g_i = 1 / training loss "
        "(the last logged mean loss in trainer_state.json) or g_i = global step; p = 0 is the uniform average. "
        "Merge: recycler `linear`, normalize, float32.",
        "",
    ]
    for kind in dict.fromkeys(r["set"] for r in rows):
        first = _select(rows, set=kind)[0]
        members = [r for r in _select(rows, set=kind, method="member", seed=seeds[0])]
        parts += [
            f"## {kind}: run `{first['run']}`, {first['n']} checkpoints ({', '.join(m['member'] for m in members)})",
            "",
            summary_table(rows, kind, args.penalties),
            "",
            f"Weights on seed {seeds[0]}:",
            "",
            weights_table(rows, kind, seeds[0], args.penalties),
            "",
            "Verdict (rules: a win needs Δ ≥ +0.5 pp on the mean and a higher score on every seed):",
            "",
            *verdict(rows, kind, args.penalties),
            "",
        ]
    parts += ["![MWA](exp_mwa.png)", "", machine_note(seconds, len(seeds), built), ""]
    path.write_text("\n".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", default="small", choices=["micro", "small"])
    ap.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="where pools are built and cached"
    )
    ap.add_argument("--penalties", type=float, nargs="+", default=list(PENALTIES))
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    args.penalties = sorted(set(args.penalties))
    say = Clock()
    from recycler.zoo.build import read_marker

    built = sum(read_marker(args.workdir / f"zoo-{args.size}-seed{s}") is None for s in args.seeds)
    rows: list[dict[str, Any]] = []
    with one_thread():
        for seed in args.seeds:
            rows += run_seed(seed, args, say)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "exp_mwa.csv")
    plot(rows, args.penalties, args.out / "exp_mwa.png")
    write_md(rows, args, say.elapsed(), built, args.out / "exp_mwa.md")
    say(f"wrote {args.out / 'exp_mwa.csv'}, .md, .png")
    print((args.out / "exp_mwa.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
