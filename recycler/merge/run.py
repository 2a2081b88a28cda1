"""`recycler merge RECIPE.yaml OUT_DIR`: a recipe file to a model dir."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from recycler.errors import RecyclerError
from recycler.export import write_model_dir
from recycler.merge.engine import MergeStats
from recycler.merge.recipe import Recipe
from recycler.pool import Pool


def pool_for_recipe(recipe: Recipe, recipe_dir: Path, *, allow_pickle: bool = False) -> Pool:
    """Open the recipe's models (and base) as a pool, one checkpoint per model entry, in order.

    A relative path is taken from the working directory, as mergekit does, or else
    from the recipe's own directory.
    """

    def locate(path: str) -> Path:
        p = Path(path).expanduser()
        if p.is_absolute() or p.exists():
            return p
        beside = recipe_dir / p
        if beside.exists():
            return beside
        raise RecyclerError(f"{path}: no such checkpoint (looked in {Path.cwd()} and {recipe_dir})")

    paths = [locate(spec.model) for spec in recipe.models]
    base = locate(recipe.base_model) if recipe.base_model is not None else None
    return Pool.from_paths(paths, base, allow_pickle=allow_pickle)


def merge_recipe_file(
    recipe_path: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    force: bool = False,
    allow_pickle: bool = False,
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    recipe = Recipe.from_yaml_file(recipe_path)
    _check_device(device)
    pool = pool_for_recipe(recipe, recipe_path.parent, allow_pickle=allow_pickle)
    stats = MergeStats()
    write_model_dir(
        out_dir,
        pool,
        recipe,
        device=device,
        force=force,
        max_shard_bytes=max_shard_bytes,
        stats=stats,
    )
    timings = os.environ.get("RECYCLER_TIMINGS_JSON")
    if timings:
        Path(timings).write_text(
            json.dumps(
                {
                    "merge_seconds": stats.seconds,
                    "bytes_read": stats.bytes_read,
                    "bytes_written": stats.bytes_written,
                    "tensors": stats.tensors,
                }
            )
        )
    gb = (stats.bytes_read + stats.bytes_written) / 1e9
    print(
        f"merged {len(pool.checkpoints)} checkpoints into {out_dir} in {stats.seconds:.2f} s ({gb / max(stats.seconds, 1e-9):.2f} GB/s)",
        file=sys.stderr,
    )
    return out_dir


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    import torch

    if not device.startswith("cuda"):
        raise RecyclerError(f"--device: unknown device {device!r} (cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise RecyclerError(f"--device {device}: no CUDA device is available")
