"""Merges that decide per entry which models' task vectors count: SCE and RAM.

τ_i = θ_i − θ_0 in fp32; weights are not read (both methods weigh the task vectors
themselves). Semantics and parameter names are mergekit 0.1.5's.

Each method's description stands beside its function (`DESCRIPTIONS`, collected by
`methods.METHODS`). PyTorch is imported inside the functions, as in `linear`: the registry
that names these
functions is read by recipe checks and by file-to-file merges that run without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recycler.merge.description import (
    INT8_MASK,
    NON_NEGATIVE,
    UNIT,
    MergeInputs,
    MethodDescription,
    ParamSpec,
)
from recycler.merge.kernel import NonFiniteError
from recycler.merge.sparsify import keep_top_k

if TYPE_CHECKING:
    import torch


def task_vector_stack(inp: MergeInputs) -> torch.Tensor:
    """τ_i stacked on a new first axis (fp32); NonFiniteError where an input is not finite."""
    import torch

    assert inp.base is not None
    base = inp.base.float()
    taus = torch.stack([v.float() - base for v in inp.versions])
    # Selecting and erasing would hide a NaN rather than pass it on: test here.
    if not bool(torch.isfinite(taus).all()):
        raise NonFiniteError
    return taus


def sign_agreement(taus: torch.Tensor) -> torch.Tensor:
    """TIES' election on (weighted) task vectors: γ = sign(Σ_i τ_i) (zero counts as +);
    true where τ_i's sign is γ (a zero entry never agrees)."""
    import torch

    elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    return taus.sign() == elected


def sce(inp: MergeInputs) -> torch.Tensor:
    """SCE (Wan et al. 2024): Select the ⌊select_topk · m⌋ entries (m: entries whose
    variance across models is non-zero) of largest variance across the models, zero the
    rest; Calculate each model's weight ∝ mean(τ̂_i²) (uniform where they sum to < 1e-6);
    Erase entries whose sign disagrees with the elected sign; θ = θ_0 + Σ c_i τ̂_i / Σ c_i
    over the agreeing models (c_i their weights; the divisor floored at 1e-6)."""
    import torch

    assert inp.base is not None
    taus = task_vector_stack(inp)
    topk = inp.value("select_topk", 1.0)
    if topk < 1:
        var = taus.var(0, unbiased=False).reshape(-1)
        k = int(int(torch.count_nonzero(var)) * topk)
        keep = keep_top_k(var.abs(), k).view(taus.shape[1:])
        taus = taus * keep
    agree = sign_agreement(taus)
    energy = taus.reshape(taus.shape[0], -1).pow(2).mean(-1)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1.0 / energy.numel()) if abs(total) < 1e-6 else energy / total
    c = weights.view(-1, *[1] * (taus.dim() - 1)) * agree
    merged = (taus * c).sum(0) / c.sum(0).clamp(min=1e-6)
    return (inp.base.float() + merged).to(inp.out_dtype)


def _contributions(inp: MergeInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(τ_i zeroed where |τ_i| ≤ epsilon, the mask of the rest, how many models contribute per
    entry)."""
    taus = task_vector_stack(inp)
    contributes = taus.abs() > inp.value("epsilon", 1e-5)
    return taus * contributes, contributes, contributes.sum(0)


def ram(inp: MergeInputs) -> torch.Tensor:
    """RAM (Reinforced Agent Merging): θ = θ_0 + Σ_i τ̃_i / max(1, c), τ̃_i = τ_i where
    |τ_i| > epsilon (else 0) and c the number of models contributing to the entry: an entry
    only one model changed keeps that change whole, shared ones are averaged."""
    assert inp.base is not None
    taus, _, counts = _contributions(inp)
    merged = (taus / counts.clamp(min=1)).sum(0)
    return (inp.base.float() + merged).to(inp.out_dtype)


def ramplus_tl(inp: MergeInputs) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, but each model's unique entries are scaled by
    λ_i = 1 + r · clamp(ρ_i, 0, alpha), ρ_i = (its shared entries) / max(epsilon, its unique
    entries), counted over the whole tensor."""
    import torch

    assert inp.base is not None
    taus, contributes, counts = _contributions(inp)
    shared = counts > 1
    unique = counts == 1
    eps = inp.value("epsilon", 1e-5)
    flat = contributes.reshape(contributes.shape[0], -1)
    n_shared = (flat & shared.reshape(1, -1)).sum(-1).float()
    n_unique = (flat & unique.reshape(1, -1)).sum(-1).float()
    rho = n_shared / n_unique.clamp(min=eps)
    lam = 1 + inp.value("r", 0.1) * rho.clamp(min=0, max=inp.value("alpha", 0.2))
    scale = torch.where(unique, lam.view(-1, *[1] * (taus.dim() - 1)), 1.0 / counts.clamp(min=1))
    merged = (taus * scale).sum(0)
    return (inp.base.float() + merged).to(inp.out_dtype)


EPSILON_RAM = ParamSpec(
    "epsilon",
    "float",
    "tensor",
    1e-5,
    "|τ| above which a model contributes to an entry",
    NON_NEGATIVE,
)

DESCRIPTIONS = (
    MethodDescription(
        "sce",
        "SCE",
        "https://arxiv.org/abs/2408.07990",
        "θ = θ_0 + Σ_{agree} c_i τ̂_i / Σ_{agree} c_i, τ̂ top-variance entries, c_i ∝ mean τ̂_i²",
        sce,
        (
            ParamSpec(
                "select_topk",
                "float",
                "tensor",
                1.0,
                "fraction of entries (by variance across models) kept",
                UNIT,
                tune=(0.1, 1.0),
            ),
            INT8_MASK,
        ),
        base="required",
        models=(1, None),
        differs="entries tied in variance are kept lowest index first",
    ),
    MethodDescription(
        "ram",
        "RAM",
        "https://arxiv.org/abs/2601.13572",
        "θ = θ_0 + Σ_i τ̃_i / max(1, #models with |τ| > ε)",
        ram,
        (EPSILON_RAM,),
        base="required",
        models=(1, None),
        row_splittable=True,
    ),
    MethodDescription(
        "ramplus_tl",
        "RAM+ (tensor-local)",
        "https://arxiv.org/abs/2601.13572",
        "RAM with each model's unique entries scaled by 1 + r · clamp(shared/unique, 0, alpha)",
        ramplus_tl,
        (
            ParamSpec(
                "r",
                "float",
                "tensor",
                0.1,
                "strength of the rescale of unique entries",
                NON_NEGATIVE,
                tune=(0.0, 0.5),
            ),
            ParamSpec(
                "alpha", "float", "tensor", 0.2, "cap on the shared/unique ratio", NON_NEGATIVE
            ),
            EPSILON_RAM,
        ),
        base="required",
        models=(1, None),
    ),
)
