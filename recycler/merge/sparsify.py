"""Sparsifying task vectors: which entries of τ_i = θ_i − θ_0 a method keeps.

Deterministic rules keep entries by magnitude rank (TIES' top-k, Breadcrumbs' band
without outliers, SCE's top-variance entries); random ones draw keep-masks (DARE's
Bernoulli(density), DELLA's rank-dependent probabilities) from seeded CPU generators
in fixed blocks of rows, so a merge reproduces bit for bit on any device and however
a tensor's rows are split across shard workers.

Entries tied in magnitude are kept lowest index first (a stable order), so the same
inputs sparsify the same way everywhere. All arithmetic is fp32.

PyTorch is imported inside the functions, as in `linear`: the registry that names these
functions is read by recipe checks and by file-to-file merges that run without it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def keep_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """A flat bool mask of the k largest entries of a flat tensor (ties: lowest index first)."""
    import torch

    n = values.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    threshold = _kth_largest(values, k)
    keep = values > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        at_threshold = values == threshold
        keep |= at_threshold & (torch.cumsum(at_threshold, 0) <= missing)
    return keep


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry. On the CPU numpy's introselect is several times
    faster than torch.kthvalue, which dominated TIES there."""
    import numpy as np
    import torch

    n = values.numel()
    if values.device.type == "cpu" and values.dtype == torch.float32:
        return torch.tensor(np.partition(values.numpy(), n - k)[n - k])
    return torch.kthvalue(values, n - k + 1).values


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the k = max(1, ⌊density · n⌋) entries of largest magnitude, zero the
    rest."""
    import torch

    flat = tau.reshape(-1)
    if density >= 1.0 or flat.numel() == 0:
        return tau
    k = max(1, int(density * flat.numel()))
    return torch.where(keep_top_k(flat.abs(), k), flat, 0.0).view_as(tau)


def magnitude_band(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask: keep the ⌊density · n⌋ entries that rank just below the
    ⌊γ n⌋ largest magnitudes (the outliers); fewer outliers are dropped where γ + density > 1."""
    import torch

    flat = tau.reshape(-1)
    n = flat.numel()
    if density >= 1.0:
        return tau
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    order = torch.sort(flat.abs(), stable=True).indices  # ascending; ties lowest index first
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    keep[order[n_bottom : n_bottom + target]] = True
    return torch.where(keep, flat, 0.0).view_as(tau)


def l1_rescale(tau: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`kept` scaled so its L1 norm is τ's (mergekit's `rescale`); unchanged where either norm
    is ~0."""
    before = float(tau.abs().sum())
    after = float(kept.abs().sum())
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def seeded_uniform(shape: torch.Size, key: str, row_offset: int) -> torch.Tensor:
    """U[0, 1) draws for rows [row_offset, row_offset + rows) of a tensor of `shape`'s row size.

    Drawn in fixed blocks of rows, each from a CPU generator seeded by (key, block index):
    any split of the rows draws the same numbers, on any device. Returned as
    (rows, entries per row).
    """
    import torch

    rows = shape[0] if len(shape) > 0 else 1
    row_numel = max(1, int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else 1
    rows_per_block = max(1, (1 << 20) // row_numel)
    out = torch.empty((rows, row_numel), dtype=torch.float32)
    first_block = row_offset // rows_per_block
    last_block = (row_offset + rows - 1) // rows_per_block
    for block in range(first_block, last_block + 1):
        block_start = block * rows_per_block
        seed = int.from_bytes(hashlib.sha256(f"{key}:{block}".encode()).digest()[:8], "little") & (
            (1 << 63) - 1
        )
        gen = torch.Generator().manual_seed(seed)
        drawn = torch.rand((rows_per_block, row_numel), generator=gen)
        lo = max(row_offset, block_start)
        hi = min(row_offset + rows, block_start + rows_per_block)
        out[lo - row_offset : hi - row_offset] = drawn[lo - block_start : hi - block_start]
    return out


def dare_mask(shape: torch.Size, density: float, key: str, row_offset: int) -> torch.Tensor:
    """A Bernoulli(density) keep-mask (see `seeded_uniform` for how it is drawn)."""
    return (seeded_uniform(shape, key, row_offset) < density).view(shape)


def dare_drop(
    tau: torch.Tensor, density: float, key: str, row_offset: int, rescale: bool = True
) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop each entry with p = 1 − density, rescale the kept by 1/density.

    This is the paper's rescale, which keeps each entry's expectation and a block of
    rows independent of the others. (mergekit 0.1.5 rescales instead so that each task
    vector keeps its L1 norm; the two agree in expectation and differ per draw, as its
    masks do from ours anyway.) `rescale: false` keeps the dropped vector unscaled, as
    in mergekit.
    """
    if density >= 1.0:
        return tau
    mask = dare_mask(tau.shape, density, key, row_offset).to(tau.device)
    return tau * mask / density if rescale else tau * mask


def della_drop(
    tau: torch.Tensor, density: float, epsilon: float, key: str, rescale: bool
) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al. 2024): within each row, the entry of magnitude rank r
    (0 = smallest, of m) is kept with p = density − ε + 2ε · r / (m − 1); with `rescale`
    the kept vector is scaled back to τ's L1 norm (mergekit's choice; the paper divides
    each kept entry by its p). A 1-D tensor is one row.
    """
    import torch

    if density >= 1.0:
        return tau
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1).to(torch.float32)
    width = rows.shape[1]
    rank_norm = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    draws = seeded_uniform(rows.shape, key, 0).view(rows.shape).to(rows.device)
    kept = torch.where(draws < probs, rows, 0.0).view_as(tau)
    return l1_rescale(tau, kept) if rescale else kept
