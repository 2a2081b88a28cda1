"""Measure whether a built zoo is a good pool for recycling: the checklist below.

- the base is mediocre at every skill: at most 0.8, and below the best fine-tuned
  checkpoint on every skill some run trains;
- every run trades skills: its last checkpoint beats the base somewhere and loses somewhere;
- no checkpoint is best on every skill;
- fine-tuning deltas are small: ‖θ_i − θ_0‖ / ‖θ_0‖ over all tensors;
- merging has something to find: the best (by mean dev accuracy) of N random
  simplex-weighted linear merges is not dominated by any single checkpoint on dev.

`measure` gives the report, `render_markdown` the table of recycler/zoo/README.md; the
development tool `python -m tools.zoo_quality DIR` prints it and writes DIR/quality.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recycler.pool import Pool
from recycler.zoo.scoring import Scorer
from recycler.zoo.skills import HELD_OUT
from recycler.zoo.soup import linear_merge
from recycler.zoo.tasks import task_name

Scores = dict[str, float]  # task -> acc
MEDIOCRE = 0.8  # the most a "mediocre" base may score on a skill


@dataclass(frozen=True)
class Merge:
    weights: list[float]
    dev: Scores
    test: Scores


def _acc(split_scores: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> Scores:
    return {t: float(split_scores[t]["acc"]) for t in tasks}


def dominates(a: Scores, b: Scores) -> bool:
    """a is at least as good as b on every task and better on one."""
    return all(a[t] >= b[t] for t in b) and any(a[t] > b[t] for t in b)


def mean(s: Scores) -> float:
    return sum(s.values()) / len(s)


def delta_ratios(zoo_dir: Path, members: Sequence[Path]) -> dict[str, float]:
    """‖θ_i − θ_0‖ / ‖θ_0‖ over every tensor, in fp32; adapters are read as base + delta by the
    pool."""
    pool = Pool.from_paths(list(members), base=zoo_dir / "base")
    try:
        assert pool.base is not None
        base_sq = 0.0
        delta_sq = dict.fromkeys(pool.names, 0.0)
        for name in pool.tensor_names:
            theta0 = pool.base.read(name).float()
            base_sq += float(theta0.square().sum())
            for ckpt in pool.checkpoints:
                delta_sq[ckpt.name] += float((ckpt.read(name).float() - theta0).square().sum())
        return {n: (d / base_sq) ** 0.5 for n, d in delta_sq.items()}
    finally:
        pool.close()


def random_simplex(n: int, count: int, seed: int) -> list[list[float]]:
    """`count` flat-Dirichlet weight vectors (x_i = −log u_i, normalised, as Optuna's FAQ draws
    them)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = -torch.log(torch.rand(n, generator=gen, dtype=torch.float64).clamp_min(1e-12))
        out.append([float(v) for v in x / x.sum()])
    return out


def measure(zoo_dir: Path, n_merges: int = 30, seed: int = 0) -> dict[str, Any]:
    """The checklist's numbers for the zoo in `zoo_dir` (its scores.json plus fresh merge
    scores)."""
    zoo_dir = Path(zoo_dir)
    doc = json.loads((zoo_dir / "scores.json").read_text())
    tasks: list[str] = doc["tasks"]
    models: dict[str, Any] = doc["models"]
    ckpts = [n for n, m in models.items() if m["kind"] == "checkpoint"]
    adapters = [n for n, m in models.items() if m["kind"] == "adapter"]
    dev = {n: _acc(models[n]["dev"], tasks) for n in models}
    base = dev["base"]

    best_single = {t: max(dev[n][t] for n in ckpts) for t in tasks}
    # Mediocre: far from perfect everywhere, and beaten by some fine-tune on every
    # skill a run trains (no run trains the held-out one, so none can beat it there).
    mediocre = {
        t: base[t] <= MEDIOCRE and (t == task_name(HELD_OUT) or base[t] < best_single[t])
        for t in tasks
    }
    runs: dict[str, str] = {}
    for n in ckpts:  # checkpoints are listed in step order within a run: keep the last
        runs[models[n]["run"]] = n
    trades = {
        run: {
            "better": [t for t in tasks if dev[n][t] > base[t]],
            "worse": [t for t in tasks if dev[n][t] < base[t]],
        }
        for run, n in runs.items()
    }
    best_on_all = [n for n in ckpts if all(dev[n][t] >= best_single[t] for t in tasks)]

    paths = [zoo_dir / models[n]["path"] for n in ckpts]
    ratios = delta_ratios(zoo_dir, [zoo_dir / models[n]["path"] for n in ckpts + adapters])

    scorer = Scorer(zoo_dir)
    merges: list[Merge] = []
    for weights in random_simplex(len(paths), n_merges, seed):
        scores = scorer.score(linear_merge(paths, weights), splits=("dev", "test"))
        merges.append(Merge(weights, _acc(scores["dev"], tasks), _acc(scores["test"], tasks)))
    best = max(merges, key=lambda m: mean(m.dev))
    dominated_by = [n for n in ckpts if dominates(dev[n], best.dev)]

    return {
        "tasks": tasks,
        "base_dev": base,
        "best_single_dev": best_single,
        "base_mediocre": mediocre,
        "run_tradeoffs": trades,
        "checkpoints_best_on_all": best_on_all,
        "delta_ratio": ratios,
        "n_merges": n_merges,
        "best_merge": {"weights": best.weights, "dev": best.dev, "test": best.test},
        "best_merge_dominated_by": dominated_by,
        "best_merge_mean_dev": mean(best.dev),
        "best_single_mean_dev": max(mean(dev[n]) for n in ckpts),
        "merges_mean_dev": [mean(m.dev) for m in merges],
        "holds": {
            "base mediocre on every skill": all(mediocre.values()),
            "every run better somewhere and worse somewhere": all(
                v["better"] and v["worse"] for v in trades.values()
            ),
            "no checkpoint best on all skills": not best_on_all,
            "best random merge not dominated on dev": not dominated_by,
        },
    }


def render_markdown(zoo_dir: Path, report: Mapping[str, Any]) -> str:
    """The README table: every model's dev/test accuracy per skill, then the checklist."""
    doc = json.loads((Path(zoo_dir) / "scores.json").read_text())
    tasks: list[str] = report["tasks"]
    short = [t.removeprefix("zoo_") for t in tasks]
    lines = [
        f"Size `{doc['size']}`, {doc['questions_per_split']} questions per skill and split; "
        f"accuracy, dev / test ({HELD_OUT} is the held-out skill).",
        "",
        "| model | kind | dtype | Δ/‖θ₀‖ | " + " | ".join(short) + " | mean |",
        "|---|---|---|---|" + "---|" * len(short) + "---|",
    ]

    def row(name: str, kind: str, dtype: str, ratio: str, dev: Scores, test: Scores) -> str:
        cells = [f"{dev[t]:.2f} / {test[t]:.2f}" for t in tasks]
        return (
            f"| {name} | {kind} | {dtype} | {ratio} | "
            + " | ".join(cells)
            + f" | {mean(dev):.3f} / {mean(test):.3f} |"
        )

    for name, m in doc["models"].items():
        dev, test = _acc(m["dev"], tasks), _acc(m["test"], tasks)
        ratio = report["delta_ratio"].get(name)
        dtype = m.get("dtype", "float32" if m["kind"] == "base" else "")
        if m.get("sharded"):
            dtype += ", sharded"
        lines.append(
            row(name, m["kind"], dtype, f"{ratio:.3f}" if ratio is not None else "", dev, test)
        )
    best = report["best_merge"]
    lines.append(
        row(
            f"best of {report['n_merges']} random merges",
            "merge",
            "float32",
            "",
            best["dev"],
            best["test"],
        )
    )
    lines += ["", "| property | holds |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in report["holds"].items()]
    ratios = list(report["delta_ratio"].values())
    lines += [
        "",
        f"Fine-tuning delta ‖θ_i − θ₀‖ / ‖θ₀‖: {min(ratios):.3f} to {max(ratios):.3f}. "
        f"Best random merge: mean dev {report['best_merge_mean_dev']:.3f} vs best single "
        "checkpoint "
        f"{report['best_single_mean_dev']:.3f}; dominated by: "
        f"{', '.join(report['best_merge_dominated_by']) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"
