"""Weighted linear merges of zoo checkpoints in memory, through recycler's own merge engine.

The zoo scores its uniform soup, and measures random simplex merges, with the
same code a search uses (`merge_state_dict`), so those numbers are what
recycler itself would report for those weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from recycler.merge.engine import merge_state_dict
from recycler.merge.recipe import ModelSpec, Recipe
from recycler.pool import Pool


def linear_recipe(
    paths: Sequence[Path], weights: Sequence[float], dtype: str = "float32"
) -> Recipe:
    """mergekit's `linear` with `normalize: true` (weights need not sum to one)."""
    return Recipe(
        merge_method="linear",
        models=[ModelSpec(model=str(p), weight=float(w)) for p, w in zip(paths, weights)],
        parameters={"normalize": True},
        dtype=dtype,
    )


def linear_merge(
    paths: Sequence[Path], weights: Sequence[float], dtype: str = "float32"
) -> dict[str, torch.Tensor]:
    """Σ w_i θ_i / Σ w_i over the checkpoint directories `paths`, in memory."""
    pool = Pool.from_paths(list(paths), base=None)
    try:
        return merge_state_dict(pool, linear_recipe(paths, weights, dtype))
    finally:
        pool.close()
