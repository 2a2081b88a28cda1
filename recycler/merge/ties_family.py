"""The TIES family: methods that sparsify the task vectors τ_i = θ_i − θ_0, then combine
them, by TIES' sign election and disjoint mean or by a plain weighted sum. TIES, DARE,
Model Breadcrumbs and DELLA are these two choices (mergekit's generalized task
arithmetic, with task arithmetic itself in `linear`).

Each method's description stands beside its function; `methods.METHODS` collects them.
Notation and conventions are `linear`'s; how entries are kept is `sparsify`'s.

PyTorch is imported inside the functions, as in `linear`: the registry that names these
functions is read by recipe checks and by file-to-file merges that run without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from recycler.merge.description import (
    Bounds,
    MergeInputs,
    MethodDescription,
    ModelRule,
    ParamSpec,
    UndefinedMerge,
)
from recycler.merge.kernel import NonFiniteError
from recycler.merge.linear import normalized_weights, task_arithmetic_params
from recycler.merge.selection import sign_agreement
from recycler.merge.sparsify import (
    dare_drop,
    della_drop,
    l1_rescale,
    magnitude_band,
    magnitude_trim,
)

if TYPE_CHECKING:
    import torch


def _task_vectors(inp: MergeInputs) -> list[torch.Tensor]:
    import torch

    assert inp.base is not None
    base = inp.base.float()
    taus = [v.float() - base for v in inp.versions]
    # Trimming and dropping would hide a NaN rather than pass it on: test here.
    if not all(bool(torch.isfinite(t).all()) for t in taus):
        raise NonFiniteError
    return taus


def _sign_consensus_merge(inp: MergeInputs, trimmed: list[torch.Tensor]) -> torch.Tensor:
    """TIES' elect + disjoint merge on (already trimmed) task vectors.

    γ = sign(Σ w_i τ̂_i) (zero counts as +); keep the weighted entries whose sign
    agrees with γ; with normalize divide by the sum of the agreeing weights.
    """
    import torch

    assert inp.base is not None
    weighted = torch.stack([w * t for w, t in zip(inp.weights, trimmed)])
    agree = sign_agreement(weighted)
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
    w = [inp.lambda_ * x for x in normalized_weights(inp.weights, inp.normalize)]
    merged = inp.base.to(torch.float32, copy=True)  # never add into the caller's tensor
    for wi, d in zip(w, deltas):
        merged.add_(d, alpha=wi)
    return merged.to(inp.out_dtype)


def _rescaled(
    inp: MergeInputs, taus: list[torch.Tensor], kept: list[torch.Tensor]
) -> list[torch.Tensor]:
    """With `rescale`, each kept vector scaled back to its task vector's L1 norm (mergekit)."""
    if not inp.flag("rescale", False):
        return kept
    return [l1_rescale(t, k) for t, k in zip(taus, kept)]


def _trimmed(inp: MergeInputs) -> list[torch.Tensor]:
    taus = _task_vectors(inp)
    return _rescaled(inp, taus, [magnitude_trim(t, d) for t, d in zip(taus, inp.densities)])


def _banded(inp: MergeInputs) -> list[torch.Tensor]:
    taus = _task_vectors(inp)
    gammas = inp.per_model("gamma", 0.01)
    return _rescaled(
        inp, taus, [magnitude_band(t, d, g) for t, d, g in zip(taus, inp.densities, gammas)]
    )


def _dare_deltas(inp: MergeInputs) -> list[torch.Tensor]:
    rescale = inp.flag("rescale", True)
    return [
        dare_drop(t, d, f"{inp.seed_key}:{i}", inp.row_offset, rescale)
        for i, (t, d) in enumerate(zip(_task_vectors(inp), inp.densities))
    ]


def _della_band(density: float, epsilon: float) -> str | None:
    """DELLA's keep probabilities density ± epsilon must be probabilities (where it drops)."""
    if density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        return f"density {density:g} ± epsilon {epsilon:g} must lie in (0, 1)"
    return None


DELLA_BAND = ModelRule(("density", "epsilon"), _della_band)


def _della_deltas(inp: MergeInputs) -> list[torch.Tensor]:
    rescale = inp.flag("rescale", True)
    epsilons = inp.per_model("epsilon", 0.15)
    out = []
    for i, (t, d, e) in enumerate(zip(_task_vectors(inp), inp.densities, epsilons)):
        why = _della_band(d, e)
        if why is not None:
            raise UndefinedMerge(f"della: model {i}: {why}")
        out.append(della_drop(t, d, e, f"{inp.seed_key}:{i}", rescale))
    return out


def _sparsified(
    sparsify: Callable[[MergeInputs], list[torch.Tensor]],
    combine: Callable[[MergeInputs, list[torch.Tensor]], torch.Tensor],
) -> Callable[[MergeInputs], torch.Tensor]:
    """A method that sparsifies the task vectors, then combines them: the TIES family is
    these two choices (TIES = trim + sign consensus, DARE-linear = random drop + sum, ...)."""

    def merge(inp: MergeInputs) -> torch.Tensor:
        return combine(inp, sparsify(inp))

    return merge


# Their formulas and sources: DESCRIPTIONS below.
ties = _sparsified(_trimmed, _sign_consensus_merge)
dare_linear = _sparsified(_dare_deltas, _disjoint_free_merge)
dare_ties = _sparsified(_dare_deltas, _sign_consensus_merge)
breadcrumbs = _sparsified(_banded, _disjoint_free_merge)
breadcrumbs_ties = _sparsified(_banded, _sign_consensus_merge)
della = _sparsified(_della_deltas, _sign_consensus_merge)
della_linear = _sparsified(_della_deltas, _disjoint_free_merge)


GAMMA = ParamSpec(
    "gamma",
    "float",
    "model",
    0.01,
    "fraction of largest magnitudes dropped as outliers",
    Bounds(0.0, 1.0),
    tune=(0.0, 0.1),
)
EPSILON_DELLA = ParamSpec(
    "epsilon",
    "float",
    "model",
    0.15,
    "half-width ε of the keep probabilities around density",
    Bounds(0.0, 1.0, low_open=True, high_open=True),
    tune=(0.01, 0.2),
)
SEEDING = "recipe random_seed and tensor name (and model index), per fixed block of rows"
_DARE_RESCALE = (
    "rescale multiplies kept entries by 1/density (the paper's, unbiased per entry, row-local so "
    "shards may split tensors); mergekit rescales to each task vector's L1 norm. Masks come from "
    "recycler's own seeded generator"
)
_MAGNITUDE_TIES = (
    "entries tied in magnitude are kept lowest index first (mergekit: unstable sort order)"
)

DESCRIPTIONS = (
    MethodDescription(
        "ties",
        "TIES",
        "https://arxiv.org/abs/2306.01708",
        "θ = θ_0 + λ Σ_{agree} w_i trim_d(τ_i) [/ Σ_{agree} w_i], "
        "sign elected by Σ w_i trim_d(τ_i)",
        ties,
        task_arithmetic_params(True, False),
        base="required",
        models=(1, None),
        differs=_MAGNITUDE_TIES,
    ),
    MethodDescription(
        "dare_linear",
        "DARE (linear)",
        "https://arxiv.org/abs/2311.03099",
        "θ = θ_0 + λ Σ w_i drop_d(τ_i) [/ Σ w_i]",
        dare_linear,
        task_arithmetic_params(False, True),
        base="required",
        models=(1, None),
        row_splittable=True,
        seeding=SEEDING,
        differs=_DARE_RESCALE,
    ),
    MethodDescription(
        "dare_ties",
        "DARE (TIES)",
        "https://arxiv.org/abs/2311.03099",
        "TIES' election and disjoint mean over drop_d(τ_i)",
        dare_ties,
        task_arithmetic_params(False, True),
        base="required",
        models=(1, None),
        seeding=SEEDING,
        differs=_DARE_RESCALE,
    ),
    MethodDescription(
        "breadcrumbs",
        "Model Breadcrumbs",
        "https://arxiv.org/abs/2312.06795",
        "θ = θ_0 + λ Σ w_i band_{d,γ}(τ_i) [/ Σ w_i], "
        "band: the ⌊dn⌋ magnitudes below the ⌊γn⌋ largest",
        breadcrumbs,
        task_arithmetic_params(False, False, GAMMA),
        base="required",
        models=(1, None),
        differs=_MAGNITUDE_TIES,
    ),
    MethodDescription(
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES",
        "https://arxiv.org/abs/2312.06795",
        "TIES' election and disjoint mean over band_{d,γ}(τ_i)",
        breadcrumbs_ties,
        task_arithmetic_params(False, False, GAMMA),
        base="required",
        models=(1, None),
        differs="as breadcrumbs",
    ),
    MethodDescription(
        "della",
        "DELLA",
        "https://arxiv.org/abs/2406.11617",
        "TIES' election and disjoint mean over magprune_{d,ε}(τ_i): "
        "keep p = d − ε + 2ε · rank/(m−1) per row",
        della,
        task_arithmetic_params(True, True, EPSILON_DELLA),
        base="required",
        models=(1, None),
        seeding=SEEDING,
        differs=("masks come from recycler's own seeded generator (mergekit: torch's global RNG)"),
        model_rules=(DELLA_BAND,),
    ),
    MethodDescription(
        "della_linear",
        "DELLA (linear)",
        "https://arxiv.org/abs/2406.11617",
        "θ = θ_0 + λ Σ w_i magprune_{d,ε}(τ_i) [/ Σ w_i]",
        della_linear,
        task_arithmetic_params(False, True, EPSILON_DELLA),
        base="required",
        models=(1, None),
        seeding=SEEDING,
        differs="as della",
        model_rules=(DELLA_BAND,),
    ),
)
