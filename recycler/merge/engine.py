"""The merge engine: a pool and a recipe in, merged tensors out, one tensor at a time.

Only one tensor's versions are in memory at once (plus the next one's being read
ahead), so peak memory stays near (number of checkpoints × largest tensor), never
the whole pool. The same `merge_tensor` serves the streaming export, the in-memory
merge of a search trial and the Ray shard workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from recycler.errors import RecyclerError
from recycler.merge.methods import METHODS, MergeInputs, NonFiniteError
from recycler.merge.recipe import Recipe

if TYPE_CHECKING:
    from recycler.merge.fisher import FisherFile
from recycler.pool import Checkpoint, Pool


@dataclass
class MergeStats:
    """What a merge moved, for benchmarks and trial timings."""

    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    per_tensor: dict[str, float] = field(default_factory=dict)


def merge_tensor(
    recipe: Recipe,
    name: str,
    versions: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    n_layers: int,
    fishers: Sequence[torch.Tensor] = (),
    row_offset: int = 0,
) -> torch.Tensor:
    """Merge one tensor (or a block of its rows starting at `row_offset`) as the recipe says."""
    out_dtype = recipe.torch_dtype
    if not versions[0].dtype.is_floating_point:
        # Integer buffers (position ids, masks) are not merged: the reference's copy is kept.
        return (base if base is not None else versions[0]).clone()
    method = METHODS[recipe.merge_method]
    inputs = MergeInputs(
        versions=versions,
        weights=recipe.weights_for(name, n_layers),
        base=base,
        out_dtype=out_dtype,
        normalize=recipe.normalize,
        lambda_=recipe.lambda_for(name, n_layers),
        densities=recipe.densities_for(name, n_layers),
        seed_key=f"{recipe.random_seed}:{name}",
        row_offset=row_offset,
        fishers=fishers,
    )
    try:
        merged = method.fn(inputs)
    except ZeroDivisionError:
        raise RecyclerError(f"tensor {name}: the weights sum to zero, which normalize cannot divide by") from None
    if not method.checks_finite and not bool(torch.isfinite(merged).all()):
        raise NonFiniteError(name)
    return merged


def iter_merged(
    pool: Pool,
    recipe: Recipe,
    device: str | torch.device = "cpu",
    stats: MergeStats | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor in the recipe's dtype), in the pool's tensor order."""
    method = METHODS[recipe.merge_method]
    if len(recipe.models) != len(pool.checkpoints):
        raise RecyclerError(f"the recipe lists {len(recipe.models)} models but the pool has {len(pool.checkpoints)}")
    if method.needs_base and pool.base is None:
        raise RecyclerError(f"{recipe.merge_method} needs a base model")
    fisher_sources = None
    if recipe.merge_method == "fisher":
        from recycler.merge.fisher import open_fishers

        fisher_sources = open_fishers(pool)
    stats = stats if stats is not None else MergeStats()
    names = list(names) if names is not None else pool.tensor_names
    sources = list(pool.checkpoints)
    use_base = method.needs_base and pool.base is not None
    if use_base:
        assert pool.base is not None
        sources.append(pool.base)
    n_layers = pool.n_layers
    # One reader thread maps the next tensor of every source while this one merges.
    reader = ThreadPoolExecutor(1, thread_name_prefix="recycler-reader")
    try:
        ahead = reader.submit(_prefetch, sources, names[0]) if names else None
        for i, name in enumerate(names):
            start = time.perf_counter()
            if ahead is not None:
                ahead.result()
            ahead = reader.submit(_prefetch, sources, names[i + 1]) if i + 1 < len(names) else None
            merged = _merge_one(pool, recipe, name, sources, use_base, fisher_sources, device, n_layers, stats)
            elapsed = time.perf_counter() - start
            stats.seconds += elapsed
            stats.per_tensor[name] = elapsed
            yield name, merged
    finally:
        reader.shutdown(wait=True, cancel_futures=True)


def _prefetch(sources: Sequence[Checkpoint], name: str) -> None:
    for ckpt in sources:
        ckpt.prefetch(name)


def _merge_one(
    pool: Pool,
    recipe: Recipe,
    name: str,
    sources: Sequence[Checkpoint],
    use_base: bool,
    fisher_sources: Sequence[FisherFile] | None,
    device: str | torch.device,
    n_layers: int,
    stats: MergeStats,
) -> torch.Tensor:
    tensors = [ckpt.read(name, device) for ckpt in sources]
    versions, base = (tensors[:-1], tensors[-1]) if use_base else (tensors, None)
    fishers = [f.read(name, device) for f in fisher_sources] if fisher_sources is not None else []
    try:
        merged = merge_tensor(recipe, name, versions, base, n_layers=n_layers, fishers=fishers)
    except NonFiniteError:
        raise RecyclerError(_non_finite_culprit(pool, name, versions, base)) from None
    stats.bytes_read += sum(t.numel() * t.element_size() for t in tensors)
    stats.bytes_written += merged.numel() * merged.element_size()
    stats.tensors += 1
    del tensors, versions, base
    for ckpt in sources:
        ckpt.release(name)
    return merged


def merge_state_dict(pool: Pool, recipe: Recipe, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The whole merged model in memory (a search trial's merge; nothing touches the disk)."""
    return dict(iter_merged(pool, recipe, device))


def _non_finite_culprit(pool: Pool, name: str, versions: Sequence[torch.Tensor], base: torch.Tensor | None) -> str:
    for ckpt, v in zip(pool.checkpoints, versions):
        if not bool(torch.isfinite(v).all()):
            return f"{ckpt.path}: tensor {name}: has non-finite values (NaN or inf)"
    if base is not None and pool.base is not None and not bool(torch.isfinite(base).all()):
        return f"{pool.base.path}: tensor {name}: has non-finite values (NaN or inf)"
    return f"tensor {name}: the merge overflowed to non-finite values (check the weights and lambda)"
