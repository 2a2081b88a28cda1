"""Merge methods: pure functions from one tensor's versions (and its base) to the merge.

Every method accumulates in fp32, whatever the stored dtype, and casts once at the
end. Notation: versions θ_1..θ_n, base θ_0, task vectors τ_i = θ_i − θ_0, weights
w_i, per-model density d_i. Semantics follow mergekit where it has the method
(`normalize` defaults included), so the same recipe gives the same tensors.

PyTorch is imported inside the functions that need it, not with the module: the
registry is read by recipe checks and by file-to-file merges that run without it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recycler.merge.kernel import NonFiniteError, linear_combination

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MergeInputs:
    """Everything a method needs for one tensor (or a block of its rows)."""

    versions: Sequence[torch.Tensor]  # one per checkpoint, stored dtype, same shape
    weights: Sequence[float]
    base: torch.Tensor | None
    out_dtype: torch.dtype
    normalize: bool = False
    lambda_: float = 1.0
    densities: Sequence[float] = ()
    # DARE: masks drawn from a generator keyed by (seed_key, model index, row block),
    # so a merge reproduces bit for bit however the tensor's rows are split.
    seed_key: str = ""
    row_offset: int = 0
    fishers: Sequence[torch.Tensor] = ()


@dataclass(frozen=True)
class LinearTerms:
    """A merge that is one linear combination: Σ c_i θ_i (+ c_0 θ_0 when `base` is set)."""

    versions: list[float]
    base: float | None = None

    def apply(
        self, versions: Sequence[torch.Tensor], base: torch.Tensor | None, out_dtype: torch.dtype
    ) -> torch.Tensor:
        # The base comes first, in every path (export and in-memory merges alike), so
        # both sum in the same order and give the same bits.
        if self.base is None:
            return linear_combination(versions, self.versions, out_dtype)
        assert base is not None
        return linear_combination([base, *versions], [self.base, *self.versions], out_dtype)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[[MergeInputs], torch.Tensor]
    needs_base: bool
    default_normalize: bool
    # True where the method's kernel raises NonFiniteError itself; otherwise the
    # engine tests the merged tensor.
    checks_finite: bool = False
    # For a method that is one linear combination per tensor: its coefficients from
    # (weights, normalize, lambda). The export then combines the stored tensors
    # file to file (`engine.FileMerger`) instead of calling `fn`.
    terms: Callable[[Sequence[float], bool, float], LinearTerms] | None = None


__all__ = [
    "METHODS",
    "LinearTerms",
    "MergeInputs",
    "MergeMethod",
    "NonFiniteError",
    "linear_combination",
]


def _normalized(weights: Sequence[float], normalize: bool) -> list[float]:
    total = sum(weights)
    if normalize:
        if abs(total) < 1e-12:
            raise ZeroDivisionError("weights sum to zero")
        return [w / total for w in weights]
    return list(weights)


def linear_terms(weights: Sequence[float], normalize: bool, lambda_: float) -> LinearTerms:
    """Weighted average (model soup; Wortsman et al. 2022): θ = Σ w_i θ_i [/ Σ w_i if normalize]."""
    return LinearTerms(_normalized(weights, normalize))


def task_arithmetic_terms(weights: Sequence[float], normalize: bool, lambda_: float) -> LinearTerms:
    """Task arithmetic (Ilharco et al. 2023): θ = θ_0 + λ Σ w_i τ_i [/ Σ w_i if normalize].

    Computed as the equivalent linear combination (1 − λ Σ w_i) θ_0 + Σ λ w_i θ_i,
    so no task vector is materialised.
    """
    w = [lambda_ * x for x in _normalized(weights, normalize)]
    return LinearTerms(w, base=1.0 - sum(w))


def linear(inp: MergeInputs) -> torch.Tensor:
    return linear_terms(inp.weights, inp.normalize, inp.lambda_).apply(
        inp.versions, None, inp.out_dtype
    )


def task_arithmetic(inp: MergeInputs) -> torch.Tensor:
    return task_arithmetic_terms(inp.weights, inp.normalize, inp.lambda_).apply(
        inp.versions, inp.base, inp.out_dtype
    )


def _task_vectors(inp: MergeInputs) -> list[torch.Tensor]:
    import torch

    assert inp.base is not None
    base = inp.base.float()
    taus = [v.float() - base for v in inp.versions]
    # Trimming and dropping would hide a NaN rather than pass it on: test here.
    if not all(bool(torch.isfinite(t).all()) for t in taus):
        raise NonFiniteError
    return taus


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density · n⌋ entries of largest magnitude, zero the rest.

    Entries tied at the threshold are kept lowest index first (a stable descending
    sort's order), so the same inputs trim the same way on every device.
    """
    import torch

    flat = tau.reshape(-1)
    n = flat.numel()
    k = int(density * n)
    if k >= n:
        return tau
    if k == 0:
        return torch.zeros_like(tau)
    magnitude = flat.abs()
    threshold = _kth_largest(magnitude, k)
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        at_threshold = magnitude == threshold
        keep |= at_threshold & (torch.cumsum(at_threshold, 0) <= missing)
    return torch.where(keep, flat, 0.0).view_as(tau)


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry. On the CPU numpy's introselect is several times
    faster than torch.kthvalue, which dominated TIES there."""
    import numpy as np
    import torch

    n = values.numel()
    if values.device.type == "cpu" and values.dtype == torch.float32:
        return torch.tensor(np.partition(values.numpy(), n - k)[n - k])
    return torch.kthvalue(values, n - k + 1).values


def dare_mask(shape: torch.Size, density: float, key: str, row_offset: int) -> torch.Tensor:
    """A Bernoulli(density) keep-mask, drawn in fixed blocks of rows from seeded CPU generators.

    Each block of rows has its own generator seeded from (key, block index), so any
    split of the rows draws the same mask, on any device.
    """
    import torch

    rows = shape[0] if len(shape) > 0 else 1
    row_numel = max(1, int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else 1
    rows_per_block = max(1, (1 << 20) // row_numel)
    mask = torch.empty((rows, row_numel), dtype=torch.bool)
    first_block = row_offset // rows_per_block
    last_block = (row_offset + rows - 1) // rows_per_block
    for block in range(first_block, last_block + 1):
        block_start = block * rows_per_block
        seed = int.from_bytes(hashlib.sha256(f"{key}:{block}".encode()).digest()[:8], "little") & (
            (1 << 63) - 1
        )
        gen = torch.Generator().manual_seed(seed)
        drawn = torch.rand((rows_per_block, row_numel), generator=gen) < density
        lo = max(row_offset, block_start)
        hi = min(row_offset + rows, block_start + rows_per_block)
        mask[lo - row_offset : hi - row_offset] = drawn[lo - block_start : hi - block_start]
    return mask.view(shape)


def dare_drop(tau: torch.Tensor, density: float, key: str, row_offset: int) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop each entry with p = 1 − density, rescale the kept by 1/density.

    This is the paper's rescale, which keeps each entry's expectation. (mergekit
    0.1.5 rescales instead so that each task vector keeps its L1 norm; the two agree
    in expectation and differ per draw, as its masks do from ours anyway.)
    """
    if density >= 1.0:
        return tau
    mask = dare_mask(tau.shape, density, key, row_offset).to(tau.device)
    return tau * mask / density


def _sign_consensus_merge(inp: MergeInputs, trimmed: list[torch.Tensor]) -> torch.Tensor:
    """TIES' elect + disjoint merge on (already trimmed) task vectors.

    γ = sign(Σ w_i τ̂_i) (zero counts as +); keep the weighted entries whose sign
    agrees with γ; with normalize divide by the sum of the agreeing weights.
    """
    import torch

    assert inp.base is not None
    weighted = torch.stack([w * t for w, t in zip(inp.weights, trimmed)])
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = weighted.sign() == elected
    merged = (weighted * agree).sum(0)
    if inp.normalize:
        w = torch.tensor(list(inp.weights), dtype=torch.float32, device=merged.device).view(
            -1, *[1] * merged.dim()
        )
        divisor = (w * agree).sum(0)
        divisor[divisor.abs() < 1e-8] = 1.0
        merged /= divisor
    return (inp.base.float() + inp.lambda_ * merged).to(inp.out_dtype)


def _disjoint_free_merge(inp: MergeInputs, deltas: list[torch.Tensor]) -> torch.Tensor:
    import torch

    assert inp.base is not None
    w = [inp.lambda_ * x for x in _normalized(inp.weights, inp.normalize)]
    merged = inp.base.to(torch.float32, copy=True)  # never add into the caller's tensor
    for wi, d in zip(w, deltas):
        merged.add_(d, alpha=wi)
    return merged.to(inp.out_dtype)


def ties(inp: MergeInputs) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each τ_i to its top-density magnitudes, elect signs, disjoint mean."""
    trimmed = [magnitude_trim(t, d) for t, d in zip(_task_vectors(inp), inp.densities)]
    return _sign_consensus_merge(inp, trimmed)


def _dare_deltas(inp: MergeInputs) -> list[torch.Tensor]:
    return [
        dare_drop(t, d, f"{inp.seed_key}:{i}", inp.row_offset)
        for i, (t, d) in enumerate(zip(_task_vectors(inp), inp.densities))
    ]


def dare_linear(inp: MergeInputs) -> torch.Tensor:
    """DARE then task arithmetic: θ_0 + λ Σ w_i DARE(τ_i)."""
    return _disjoint_free_merge(inp, _dare_deltas(inp))


def dare_ties(inp: MergeInputs) -> torch.Tensor:
    """DARE then TIES' sign election and disjoint merge."""
    return _sign_consensus_merge(inp, _dare_deltas(inp))


def fisher(inp: MergeInputs) -> torch.Tensor:
    """Fisher merging (Matena & Raffel 2021): θ_j = Σ_i w_i F_ij θ_ij / Σ_i w_i F_ij.

    F_i is checkpoint i's diagonal Fisher, scaled to unit norm over the whole model
    and floored at 1e-6 (their code's choices; see `fisher.py`). F = 1 is plain averaging.
    """
    import torch

    num = torch.zeros(inp.versions[0].shape, dtype=torch.float32, device=inp.versions[0].device)
    den = torch.zeros_like(num)
    for v, w, f in zip(inp.versions, inp.weights, inp.fishers):
        wf = f.float() * w
        num.addcmul_(wf, v.float())
        den.add_(wf)
    return (num / den).to(inp.out_dtype)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod(
            "linear",
            linear,
            needs_base=False,
            default_normalize=True,
            checks_finite=True,
            terms=linear_terms,
        ),
        MergeMethod(
            "task_arithmetic",
            task_arithmetic,
            needs_base=True,
            default_normalize=False,
            checks_finite=True,
            terms=task_arithmetic_terms,
        ),
        MergeMethod("ties", ties, needs_base=True, default_normalize=True),
        MergeMethod("dare_linear", dare_linear, needs_base=True, default_normalize=False),
        MergeMethod("dare_ties", dare_ties, needs_base=True, default_normalize=False),
        MergeMethod("fisher", fisher, needs_base=False, default_normalize=False),
    ]
}
