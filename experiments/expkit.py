"""Shared plumbing for the experiments on the demo pool (exp_mwa.py, exp_fisher.py).

- `ensure_pool`: build (or reuse) `recycler zoo build` pools under the work dir.
- `TestScorer`: one resident float32 model scoring weight sets on the zoo's
  TEST split (the zoo's own `Scorer`, so the numbers agree with scores.json).
- `linear_merge`: recycler's merge engine, `linear` with `normalize: true`,
  with the zoo's base opened too so LoRA adapter dirs read as base + delta.
- `one_thread`: the zoo's single-thread policy (tiny matrices, shared CPU).
- small statistics / formatting helpers for the result tables.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recycler.merge.engine import merge_state_dict
from recycler.merge.recipe import ModelSpec, Recipe
from recycler.pool import Pool
from recycler.zoo.build import DEFAULT_ARCHITECTURE, quiet_libraries

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
DEFAULT_WORKDIR = ROOT / "experiments" / "_pools"  # git-ignored
TRAINED = ("inc", "dec", "rev", "rot")
HELD_OUT = "sort"


class Clock:
    """Progress lines with the seconds since start, on stdout."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {message}", flush=True)


# The zoo's own policy: one torch thread, no transformers progress bars, restored after.
one_thread = quiet_libraries


def ensure_pool(
    workdir: Path, size: str, seed: int, say: Clock, *, architecture: str = DEFAULT_ARCHITECTURE
) -> Path:
    """The demo pool of this size, seed and architecture under `workdir`, built on first use
    (cached afterwards)."""
    from recycler.zoo.build import build_zoo, read_marker

    # The default architecture keeps the folder name it had before there was a choice, so
    # the Llama pools already built are reused.
    arch = "" if architecture == DEFAULT_ARCHITECTURE else f"-{architecture}"
    out = Path(workdir) / f"zoo-{size}{arch}-seed{seed}"
    if read_marker(out) is None:
        say(f"building pool {out} (size {size}, seed {seed}, {architecture}; ~2 min for small)")
    return build_zoo(out, size=size, seed=seed, architecture=architecture, quiet=True)


def runs_in(zoo: Path, sub: str) -> dict[str, list[Path]]:
    """run name -> its checkpoint dirs under zoo/sub (sorted by step)."""
    out: dict[str, list[Path]] = {}
    for d in sorted((zoo / sub).iterdir()):
        if d.is_dir() and "-step" in d.name:
            out.setdefault(d.name.rsplit("-step", 1)[0], []).append(d)
    for dirs in out.values():
        dirs.sort(key=lambda d: int(d.name.rsplit("-step", 1)[1]))
    return out


def linear_merge(
    paths: Sequence[Path], weights: Sequence[float], base: Path | None
) -> dict[str, torch.Tensor]:
    """Σ w_i θ_i / Σ w_i in float32 through recycler's engine; adapters read as base + delta."""
    return merge(paths, weights, base, "linear", {"normalize": True})


def merge(
    paths: Sequence[Path],
    weights: Sequence[float],
    base: Path | None,
    method: str,
    parameters: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    recipe = Recipe(
        merge_method=method,
        models=[ModelSpec(model=str(p), weight=float(w)) for p, w in zip(paths, weights)],
        parameters=dict(parameters),
        dtype="float32",
    )
    pool = Pool.from_paths(list(paths), base=base)
    try:
        return merge_state_dict(pool, recipe)
    finally:
        pool.close()


class TestScorer:
    """Scores weight sets on the zoo's TEST split: skill -> acc, plus the means the experiments
    report."""

    def __init__(self, zoo: Path) -> None:
        from recycler.zoo.scoring import Scorer

        self.scorer = Scorer(zoo)
        self.evaluations = 0

    def score(
        self, weights: Mapping[str, torch.Tensor], own: Sequence[str] = (), split: str = "test"
    ) -> dict[str, float]:
        """inc..sort accuracies, `mean4` (the four trained skills), `zoo_mean` (all five, the zoo
        group),
        and `own_mean` (the skills in `own`, e.g. the run's training mixture); on the test split
        unless told (the searches' experiments also choose on dev)."""
        out = self.scorer.score(weights, splits=(split,))[split]
        self.evaluations += 1
        acc = {skill: out[f"zoo_{skill}"]["acc"] for skill in (*TRAINED, HELD_OUT)}
        row = dict(acc)
        row["mean4"] = statistics.fmean(acc[s] for s in TRAINED)
        row["zoo_mean"] = statistics.fmean(acc.values())
        if own:
            row["own_mean"] = statistics.fmean(acc[s] for s in own)
        return row


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± std' in percent (accuracy points)."""
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Rows (all with the first row's keys) as CSV, floats to 4 decimals."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(
            {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        )


def save_figure(fig: Any, path: Path) -> None:
    """Write a results figure (PNG, the experiments' one size) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_note(seconds: float, n_seeds: int, built: int) -> str:
    import os

    return (
        f"Measured: {seconds:.0f} s wall for {n_seeds} seed(s) on this machine ({os.cpu_count()} "
        "cores, shared), "
        f"{built} pool(s) built during the run; one torch thread. Command: `{' '.join(sys.argv)}`."
    )
