"""Experiment 3: Fisher merging (Matena & Raffel 2021) against plain averaging at equal weights.

    python experiments/exp_fisher.py [--seeds 0 1 2] [--size small] [--workdir experiments/_pools]
                                     [--examples 256] [--out experiments/results]

For each pool seed (a `recycler zoo build`, cached under the work dir) and each
full checkpoint, the diagonal empirical Fisher is estimated with `recycler fisher`
(recycler.merge.fisher.estimate_fisher_file) from a jsonl of training-like text,
drawn with the zoo's own generator (recycler.zoo.skills.TrainStream): clean
answers, every dev and test prompt excluded, so no evaluation question is seen.
Two data choices:

- `own`: each checkpoint's Fisher on its own run's training mixture (the paper's
  setting: each model's Fisher on its own task's data);
- `shared`: every checkpoint's Fisher on one mixture of the four trained skills.

Merges, all at equal weights (the paper's λ_i = 1/n), recycler's engine in float32:
`average` (linear, normalize) vs `fisher` (θ = Σ F_i θ_i / Σ F_i, each F_i at unit
norm, floored at 1e-6), over (a) all the full checkpoints, (b) the four runs' final
checkpoints, (c) every pair of runs' final checkpoints. Scored on the TEST split.
Deterministic: the text is seeded, the Fisher is empirical (no sampling).

Writes experiments/results/exp_fisher.{csv,md,png}. The Fisher files are cached
under WORKDIR/fisher/ and copied beside the checkpoints (`fisher.safetensors`,
where the merge engine looks) for the merge, then removed again.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from expkit import (  # the helper beside this script
    DEFAULT_WORKDIR,
    HELD_OUT,
    RESULTS,
    TRAINED,
    Clock,
    TestScorer,
    ensure_pool,
    machine_note,
    md_table,
    mean_std,
    merge,
    one_thread,
    pm,
    runs_in,
    save_figure,
)

DATA_KINDS = ("own", "shared")
SHARED_MIXTURE = {s: 1.0 for s in TRAINED}
SCORE_COLS = (*TRAINED, HELD_OUT, "mean4", "zoo_mean")
NOISE = 0.005  # 4 questions of the 800 behind mean (4): below this, no win or loss is called


def write_data(
    path: Path, mixture: dict[str, float], seed: int, size: str, n: int, tag: str
) -> Path:
    """n training-distribution texts (prompt + clean answer), no dev/test prompt, as jsonl."""
    from recycler.zoo.skills import TrainStream, eval_sets
    from recycler.zoo.spec import get_spec

    exclude = {
        e.prompt
        for splits in eval_sets(seed, get_spec(size).eval_per_split).values()
        for exs in splits.values()
        for e in exs
    }
    pairs = TrainStream(mixture, exclude, f"fisher-{seed}-{tag}").take(n)
    assert not exclude & {p for p, _ in pairs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": p + a}) + "\n" for p, a in pairs))
    return path


def fisher_for(ckpt: Path, data: Path, cache: Path, n: int, say: Clock) -> Path:
    """This checkpoint's Fisher on `data`, computed by `recycler fisher` once and cached at
    `cache`."""
    from recycler.merge.fisher import estimate_fisher_file
    from recycler.pool.safetensors_file import SafetensorsFile

    if cache.is_file():
        meta = SafetensorsFile(cache).metadata
        if meta.get("n_examples") == str(n) and meta.get("data") == str(data):
            return cache
    out = estimate_fisher_file(ckpt, data, n_examples=n).path
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(out), cache)
    return cache


def install(fishers: dict[Path, Path]) -> None:
    for ckpt, f in fishers.items():
        shutil.copyfile(f, ckpt / "fisher.safetensors")


def uninstall(ckpts: Sequence[Path]) -> None:
    for c in ckpts:
        (c / "fisher.safetensors").unlink(missing_ok=True)


def rel_distance(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> float:
    """‖a − b‖ / ‖b − θ0‖ over all tensors: how far Fisher weighting moves the merge, relative to
    the average's delta."""
    num = sum(float((a[k].float() - b[k].float()).square().sum()) for k in b)
    den = sum(float((b[k].float() - base[k].float()).square().sum()) for k in b if k in base)
    return (num / den) ** 0.5 if den > 0 else float("nan")


def run_seed(seed: int, args: argparse.Namespace, say: Clock) -> list[dict[str, Any]]:
    from recycler.zoo import checkpoints as ck
    from recycler.zoo.spec import get_spec

    spec = get_spec(args.size)
    zoo = ensure_pool(args.workdir, args.size, seed, say)
    runs = runs_in(zoo, "checkpoints")
    every = [d for dirs in runs.values() for d in dirs]
    finals = {run: dirs[-1] for run, dirs in runs.items()}
    mixtures = {r.name: r.mixture for r in spec.runs}
    work = args.workdir / "fisher" / f"{args.size}-seed{seed}-n{args.examples}"

    data = {
        ("shared", run): write_data(
            work / "data-shared.jsonl", SHARED_MIXTURE, seed, args.size, args.examples, "shared"
        )
        for run in runs
    }
    for run in runs:
        data[("own", run)] = write_data(
            work / f"data-own-{run}.jsonl", mixtures[run], seed, args.size, args.examples, run
        )
    fishers: dict[str, dict[Path, Path]] = {k: {} for k in DATA_KINDS}
    for kind in DATA_KINDS:
        for run, dirs in runs.items():
            for d in dirs:
                fishers[kind][d] = fisher_for(
                    d, data[(kind, run)], work / kind / f"{d.name}.safetensors", args.examples, say
                )
        say(f"seed {seed}: Fisher ({kind} data) ready for {len(fishers[kind])} checkpoints")

    sets: list[tuple[str, str, list[Path]]] = [
        ("all", f"all {len(every)} checkpoints", every),
        ("finals", f"final checkpoints of the {len(finals)} runs", list(finals.values())),
    ]
    if not args.no_pairs:
        sets += [
            ("pair", f"{a} + {b}", [finals[a], finals[b]])
            for a, b in itertools.combinations(sorted(finals), 2)
        ]

    scorer = TestScorer(zoo)
    base_sd = ck.read_full(zoo / "base")
    rows: list[dict[str, Any]] = []
    uninstall(every)
    try:
        for group, label, paths in sets:
            equal = [1.0 / len(paths)] * len(paths)
            avg = merge(paths, equal, None, "linear", {"normalize": True})
            rows.append(
                {
                    "seed": seed,
                    "group": group,
                    "set": label,
                    "n": len(paths),
                    "method": "average",
                    "data": "",
                    "moved": 0.0,
                    **scorer.score(avg),
                }
            )
            for kind in DATA_KINDS:
                install({p: fishers[kind][p] for p in paths})
                try:
                    fm = merge(paths, equal, None, "fisher", {})
                finally:
                    uninstall(paths)
                rows.append(
                    {
                        "seed": seed,
                        "group": group,
                        "set": label,
                        "n": len(paths),
                        "method": "fisher",
                        "data": kind,
                        "moved": rel_distance(fm, avg, base_sd),
                        **scorer.score(fm),
                    }
                )
            a, f1, f2 = (r["mean4"] for r in rows[-3:])
            say(
                f"seed {seed} {label}: mean4 average {a:.3f}, fisher(own) {f1:.3f}, fisher(shared) "
                f"{f2:.3f}"
            )
    finally:
        uninstall(every)
    return rows


# ---------------------------------------------------------------- reporting


def _sel(rows: list[dict[str, Any]], **where: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _pair_means(rows: list[dict[str, Any]], method: str, data: str) -> list[dict[str, Any]]:
    """Per seed, the mean over the pairs (one pseudo-row per seed)."""
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        sel = _sel(rows, group="pair", method=method, data=data, seed=seed)
        if sel:
            out.append(
                {
                    "seed": seed,
                    **{c: sum(r[c] for r in sel) / len(sel) for c in (*SCORE_COLS, "moved")},
                }
            )
    return out


def _delta(a: list[dict[str, Any]], b: list[dict[str, Any]], col: str = "mean4") -> list[float]:
    """Paired differences a − b, matched on (seed, checkpoint set)."""
    bb = {(r["seed"], r.get("set")): r[col] for r in b}
    return [r[col] - bb[(r["seed"], r.get("set"))] for r in a if (r["seed"], r.get("set")) in bb]


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    labels = list(dict.fromkeys(r["set"] for r in rows))
    if _sel(rows, group="pair"):
        labels.append("mean over the pairs")
    for label in labels:
        for method, data in (("average", ""), ("fisher", "own"), ("fisher", "shared")):
            if label == "mean over the pairs":
                sel = _pair_means(rows, method, data)
                ref = _pair_means(rows, "average", "")
            else:
                sel = _sel(rows, set=label, method=method, data=data)
                ref = _sel(rows, set=label, method="average")
            d = _delta(sel, ref)
            name = "average" if method == "average" else f"Fisher ({data} data)"
            moved = "" if method == "average" else f"{mean_std([r['moved'] for r in sel])[0]:.2f}"
            delta = (
                ""
                if method == "average"
                else f"{mean_std(d)[0] * 100:+.2f} ± {mean_std(d)[1] * 100:.2f} "
                f"({sum(x > 0 for x in d)}/{len(d)})"
            )
            body.append(
                [
                    label,
                    name,
                    *(pm([r[c] for r in sel]) for c in (*TRAINED, "mean4", HELD_OUT)),
                    delta,
                    moved,
                ]
            )
    return md_table(
        [
            "checkpoints",
            "merge",
            *TRAINED,
            "**mean (4)**",
            "sort (held out)",
            "Δ mean vs average (seeds higher)",
            "‖θ_F − θ_avg‖ / ‖θ_avg − θ₀‖",
        ],
        body,
    )


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    n_seeds = len({r["seed"] for r in rows})
    targets = [("all", "all checkpoints"), ("finals", "the runs' final checkpoints")]
    for group, name in targets:
        for kind in DATA_KINDS:
            d = _delta(
                _sel(rows, group=group, method="fisher", data=kind),
                _sel(rows, group=group, method="average"),
            )
            if not d:
                continue
            m, s = mean_std(d)
            wins = sum(x > 0 for x in d)
            word = (
                "beats"
                if m >= NOISE and wins == n_seeds
                else ("is worse than" if m <= -NOISE else "does not beat")
            )
            out.append(
                f"- {name}, Fisher on {kind} data {word} plain averaging: Δ mean {m * 100:+.2f} ± "
                f"{s * 100:.2f} pp "
                f"(higher in {wins}/{n_seeds} seeds)."
            )
    for kind in DATA_KINDS:
        pairs = _sel(rows, group="pair", method="fisher", data=kind)
        if pairs:
            d = _delta(pairs, _sel(rows, group="pair", method="average"))
            wins = sum(x > 0 for x in d)
            ties = sum(abs(x) < NOISE for x in d)
            out.append(
                f"- pairs of final checkpoints, Fisher on {kind} data: higher mean in "
                f"{wins}/{len(d)} "
                f"(pair, seed) cases, within ±0.5 pp in {ties}; mean Δ {mean_std(d)[0] * 100:+.2f} "
                "pp."
            )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["set"] for r in rows if r["group"] != "pair"))
    has_pairs = bool(_sel(rows, group="pair"))
    xs = [*labels, *(["mean over pairs"] if has_pairs else [])]
    methods = (
        ("average", "", "plain average"),
        ("fisher", "own", "Fisher (own data)"),
        ("fisher", "shared", "Fisher (shared data)"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, col, title in (
        (axes[0], "mean4", "mean test acc, 4 trained skills"),
        (axes[1], HELD_OUT, "test acc, held-out sort"),
    ):
        width = 0.27
        for k, (method, data, name) in enumerate(methods):
            means, stds = [], []
            for x in xs:
                sel = (
                    _pair_means(rows, method, data)
                    if x == "mean over pairs"
                    else _sel(rows, set=x, method=method, data=data)
                )
                m, s = mean_std([r[col] for r in sel])
                means.append(m)
                stds.append(s)
            pos = [i + (k - 1) * width for i in range(len(xs))]
            ax.bar(pos, means, width, yerr=stds, capsize=3, label=name)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, fontsize=8)
        lo = min(r[col] for r in rows)
        ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(r[col] for r in rows) + 0.03))
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle(
        f"Fisher merging vs plain averaging, equal weights (test split, mean ± std over {n_seeds} "
        "pool seeds)"
    )
    save_figure(fig, path)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = ["seed", "group", "set", "n", "method", "data", "moved", *SCORE_COLS]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in cols})


def write_md(
    rows: list[dict[str, Any]], args: argparse.Namespace, seconds: float, built: int, path: Path
) -> None:
    seeds = sorted({r["seed"] for r in rows})
    parts = [
        "# Experiment 3: Fisher merging (Matena & Raffel 2021) vs plain averaging",
        "",
        f"Demo pool `--size {args.size}`, pool seeds {seeds}; TEST split; accuracy in percent, "
        "mean ± sample std over "
        "the pool seeds; **mean (4)** = the four fine-tuned skills, `sort` held out. Equal weights "
        "everywhere. "
        f"Fisher: `recycler fisher` (empirical, {args.examples} examples of prompt+answer text "
        "from the zoo's training "
        "generator, no dev/test prompt), log-likelihood of every next character. `own` = each "
        "checkpoint's run mixture, "
        "`shared` = inc+dec+rev+rot. Δ is paired per seed. The last column is how far Fisher "
        "weighting moves the merge, "
        "relative to the plain average's distance from the base.",
        "",
        table(rows),
        "",
        "Verdict (rules: a win needs Δ ≥ +0.5 pp on the mean and a higher score on every seed):",
        "",
        *verdict(rows),
        "",
        "![Fisher](exp_fisher.png)",
        "",
        machine_note(seconds, len(seeds), built),
        "",
    ]
    path.write_text("\n".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", default="small", choices=["micro", "small"])
    ap.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="where pools and Fisher files are built and cached",
    )
    ap.add_argument("--examples", type=int, default=256, help="examples per Fisher estimate")
    ap.add_argument("--no-pairs", action="store_true", help="skip the pairs of final checkpoints")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    say = Clock()
    from recycler.zoo.build import read_marker

    built = sum(read_marker(args.workdir / f"zoo-{args.size}-seed{s}") is None for s in args.seeds)
    rows: list[dict[str, Any]] = []
    with one_thread():
        for seed in args.seeds:
            rows += run_seed(seed, args, say)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "exp_fisher.csv")
    plot(rows, args.out / "exp_fisher.png")
    write_md(rows, args, say.elapsed(), built, args.out / "exp_fisher.md")
    say(f"wrote {args.out / 'exp_fisher.csv'}, .md, .png")
    print((args.out / "exp_fisher.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
