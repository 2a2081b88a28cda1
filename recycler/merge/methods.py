"""Merge methods: pure functions from one tensor's versions (and its base) to the merge,
and `METHODS`, the registry of their descriptions (`description.MethodDescription`).

Every method accumulates in fp32, whatever the stored dtype, and casts once at the
end. Notation: versions θ_1..θ_n, base θ_0, task vectors τ_i = θ_i − θ_0, weights
w_i, per-model density d_i. Semantics and parameter names follow mergekit 0.1.5
(`normalize` defaults included), so the same recipe gives the same tensors; where
recycler differs on purpose, the description's `differs` says how and why.

PyTorch is imported inside the functions that need it, not with the module: the
registry is read by recipe checks and by file-to-file merges that run without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from recycler.merge import geometric, selection
from recycler.merge.description import (
    NON_NEGATIVE,
    UNIT,
    Bounds,
    Coupling,
    Endpoints,
    LinearTerms,
    MergeInputs,
    MethodDescription,
    ParamSpec,
    TensorParams,
    UndefinedMerge,
)
from recycler.merge.kernel import NonFiniteError, linear_combination
from recycler.merge.sparsify import (
    dare_drop,
    dare_mask,
    della_drop,
    l1_rescale,
    magnitude_band,
    magnitude_trim,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "METHODS",
    "LinearTerms",
    "MergeInputs",
    "NonFiniteError",
    "UndefinedMerge",
    "apply_terms",
    "dare_mask",
    "linear_combination",
    "magnitude_trim",
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


def apply_terms(
    terms: LinearTerms,
    versions: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Σ c_i θ_i (+ c_0 θ_0). The base comes first, in every path (export and in-memory
    merges alike), so both sum in the same order and give the same bits."""
    if terms.base is None:
        return linear_combination(versions, terms.versions, out_dtype)
    assert base is not None
    return linear_combination([base, *versions], [terms.base, *terms.versions], out_dtype)


def linear(inp: MergeInputs) -> torch.Tensor:
    return apply_terms(
        linear_terms(inp.weights, inp.normalize, inp.lambda_), inp.versions, None, inp.out_dtype
    )


def task_arithmetic(inp: MergeInputs) -> torch.Tensor:
    return apply_terms(
        task_arithmetic_terms(inp.weights, inp.normalize, inp.lambda_),
        inp.versions,
        inp.base,
        inp.out_dtype,
    )


def passthrough_terms(p: TensorParams) -> LinearTerms:
    """Passthrough: the one model's tensor, times its `scale`."""
    return LinearTerms([float(p.per_model.get("scale", [1.0])[0])])


def passthrough(inp: MergeInputs) -> torch.Tensor:
    return apply_terms(passthrough_terms(inp.params), inp.versions, None, inp.out_dtype)


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
    agree = selection.sign_agreement(weighted)
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


def _della_deltas(inp: MergeInputs) -> list[torch.Tensor]:
    rescale = inp.flag("rescale", True)
    epsilons = inp.per_model("epsilon", 0.15)
    out = []
    for i, (t, d, e) in enumerate(zip(_task_vectors(inp), inp.densities, epsilons)):
        if d < 1.0 and not (d - e > 0.0 and d + e < 1.0):
            raise UndefinedMerge(
                f"della: density {d:g} ± epsilon {e:g} of model {i} must lie in (0, 1)"
            )
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


# Their formulas and sources: the METHODS table below.
ties = _sparsified(_trimmed, _sign_consensus_merge)
dare_linear = _sparsified(_dare_deltas, _disjoint_free_merge)
dare_ties = _sparsified(_dare_deltas, _sign_consensus_merge)
breadcrumbs = _sparsified(_banded, _disjoint_free_merge)
breadcrumbs_ties = _sparsified(_banded, _sign_consensus_merge)
della = _sparsified(_della_deltas, _sign_consensus_merge)
della_linear = _sparsified(_della_deltas, _disjoint_free_merge)


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


# ---- parameters, as mergekit 0.1.5 names them -------------------------------------------
def _weight(doc: str = "the model's weight w_i") -> ParamSpec:
    return ParamSpec("weight", "float", "model", 1.0, doc)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec(
        "normalize", "bool", "recipe", default, "divide by the sum of the (agreeing) weights"
    )


DENSITY = ParamSpec(
    "density", "float", "model", 1.0, "fraction d_i of τ_i's entries kept", UNIT, tune=(0.1, 1.0)
)
LAMBDA = ParamSpec(
    "lambda", "float", "tensor", 1.0, "scale λ of the merged task vector", tune=(0.5, 1.5)
)
INT8_MASK = ParamSpec(
    "int8_mask", "bool", "recipe", False, "mergekit's memory switch; no effect (masks are bool)"
)


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec(
        "rescale", "bool", "recipe", default, "scale the kept entries back up (see the method)"
    )


def _gta(
    normalize: bool, rescale: bool, *extra: ParamSpec, sparse: bool = True
) -> tuple[ParamSpec, ...]:
    """The parameters of mergekit's generalized task arithmetic family."""
    return (
        _weight(),
        *((DENSITY,) if sparse else ()),
        *extra,
        _normalize(normalize),
        LAMBDA,
        _rescale(rescale),
        INT8_MASK,
    )


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
EPSILON_RAM = ParamSpec(
    "epsilon",
    "float",
    "tensor",
    1e-5,
    "|τ| above which a model contributes to an entry",
    NON_NEGATIVE,
)
T_SLERP = ParamSpec(
    "t",
    "float",
    "tensor",
    None,
    "interpolation factor: 0 is the base (first) model, 1 the other",
    tune=(0.0, 1.0),
)
T_NEARSWAP = ParamSpec(
    "t",
    "float",
    "tensor",
    None,
    "distance within which the model's value is taken",
    NON_NEGATIVE,
    tune=(1e-4, 1e-2),
)


def _della_epsilon_limit(density: float) -> float:
    """The largest epsilon (exclusive) that keeps density ± epsilon inside (0, 1); della
    keeps every entry at density 1 and reads no epsilon there."""
    return math.inf if density >= 1.0 else min(density, 1.0 - density)


DELLA_EPSILON = Coupling(
    "epsilon", "density", _della_epsilon_limit, "density ± epsilon must lie in (0, 1)"
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

METHODS: dict[str, MethodDescription] = {
    m.name: m
    for m in [
        MethodDescription(
            "linear",
            "Linear (model soup)",
            "https://arxiv.org/abs/2203.05482",
            "θ = Σ w_i θ_i [/ Σ w_i]",
            linear,
            (_weight(), _normalize(True)),
            base="none",
            models=(1, None),
            terms=lambda p: linear_terms(p.weights, p.normalize, p.lambda_),
            row_splittable=True,
            checks_finite=True,
        ),
        MethodDescription(
            "task_arithmetic",
            "Task arithmetic",
            "https://arxiv.org/abs/2212.04089",
            "θ = θ_0 + λ Σ w_i τ_i [/ Σ w_i]",
            task_arithmetic,
            _gta(False, False, sparse=False),
            base="required",
            models=(1, None),
            terms=lambda p: task_arithmetic_terms(p.weights, p.normalize, p.lambda_),
            row_splittable=True,
            checks_finite=True,
        ),
        MethodDescription(
            "ties",
            "TIES",
            "https://arxiv.org/abs/2306.01708",
            "θ = θ_0 + λ Σ_{agree} w_i trim_d(τ_i) [/ Σ_{agree} w_i], "
            "sign elected by Σ w_i trim_d(τ_i)",
            ties,
            _gta(True, False),
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
            _gta(False, True),
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
            _gta(False, True),
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
            _gta(False, False, GAMMA),
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
            _gta(False, False, GAMMA),
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
            _gta(True, True, EPSILON_DELLA),
            base="required",
            models=(1, None),
            seeding=SEEDING,
            differs=(
                "masks come from recycler's own seeded generator (mergekit: torch's global RNG)"
            ),
            couplings=(DELLA_EPSILON,),
        ),
        MethodDescription(
            "della_linear",
            "DELLA (linear)",
            "https://arxiv.org/abs/2406.11617",
            "θ = θ_0 + λ Σ w_i magprune_{d,ε}(τ_i) [/ Σ w_i]",
            della_linear,
            _gta(False, True, EPSILON_DELLA),
            base="required",
            models=(1, None),
            seeding=SEEDING,
            differs="as della",
            couplings=(DELLA_EPSILON,),
        ),
        MethodDescription(
            "slerp",
            "SLERP",
            "https://en.wikipedia.org/wiki/Slerp",
            "θ = sin((1−t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b over whole tensors "
            "(lerp if |cos Ω| > 0.9995)",
            geometric.slerp,
            (T_SLERP,),
            base="optional",
            models=(2, 2),
            models_with_base=(1, 1),
            differs=(
                "without a base the first model is t = 0 (mergekit requires the base); "
                "‖·‖ and cos Ω in fp64"
            ),
            endpoints=Endpoints("t", 0.0, 1.0),
        ),
        MethodDescription(
            "nuslerp",
            "NuSLERP",
            "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
            "slerp(τ_1, τ_2) or slerp(θ_1, θ_2) with t = w_2/(w_1 + w_2), "
            "whole tensor, per row or per column",
            geometric.nuslerp,
            (
                _weight(),
                ParamSpec(
                    "nuslerp_flatten", "bool", "recipe", True, "one slerp over the flattened tensor"
                ),
                ParamSpec(
                    "nuslerp_row_wise",
                    "bool",
                    "recipe",
                    False,
                    "unflattened: slerp columns instead of rows",
                ),
            ),
            base="optional",
            models=(2, 2),
        ),
        MethodDescription(
            "multislerp",
            "Multi-SLERP",
            "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            "exp_μ(Σ w_i log_μ x̂_i) · Σ w_i ‖x_i‖ on the unit sphere (x_i = θ_i or τ_i)",
            geometric.multislerp,
            (
                _weight(),
                ParamSpec(
                    "normalize_weights", "bool", "recipe", True, "weights divided by their sum"
                ),
                ParamSpec(
                    "eps",
                    "float",
                    "recipe",
                    1e-8,
                    "guard against zero norms",
                    Bounds(0.0, low_open=True),
                ),
            ),
            base="optional",
            models=(1, None),
        ),
        MethodDescription(
            "karcher",
            "Karcher mean",
            "https://en.wikipedia.org/wiki/Karcher_mean",
            "Riemannian mean of x̂_i on the unit sphere (fixed point), scaled by Σ α_i ‖x_i‖",
            geometric.karcher,
            (
                _weight("weight α_i of the model (normalised; mergekit: all equal, the default)"),
                ParamSpec("max_iter", "int", "recipe", 10, "iterations at most", Bounds(1.0)),
                ParamSpec(
                    "tol",
                    "float",
                    "recipe",
                    1e-5,
                    "stop when the tangent's norm is below",
                    Bounds(0.0, low_open=True),
                ),
            ),
            base="optional",
            models=(1, None),
            differs=(
                "weights α_i are read (mergekit ignores them: equal weights, the default, "
                "give its merge)"
            ),
        ),
        MethodDescription(
            "model_stock",
            "Model Stock",
            "https://arxiv.org/abs/2403.19522",
            "θ = t · mean θ_i + (1 − t) θ_0, t = N cos/(1 + (N − 1) cos), "
            "cos the mean pairwise cosine of τ_i",
            geometric.model_stock,
            (
                ParamSpec(
                    "filter_wise", "bool", "recipe", False, "one t per row instead of per tensor"
                ),
            ),
            base="required",
            models=(2, None),
        ),
        MethodDescription(
            "nearswap",
            "NearSwap",
            "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            "θ = w θ_1 + (1 − w) θ_0, w = clamp(t / |θ_1 − θ_0|, 0, 1) per entry",
            geometric.nearswap,
            (T_NEARSWAP,),
            base="required",
            models=(1, 1),
            row_splittable=True,
        ),
        MethodDescription(
            "arcee_fusion",
            "Arcee Fusion",
            "https://arcee.ai",
            "θ = θ_0 + τ_1 · [|τ_1| · KL(softmax θ_1 ‖ softmax θ_0) ≥ median + 1.5 IQR]",
            geometric.arcee_fusion,
            (),
            base="required",
            models=(1, 1),
            differs=(
                "quantiles are exact (mergekit samples 10⁶ entries at random, unseeded, "
                "above that size)"
            ),
        ),
        MethodDescription(
            "sce",
            "SCE",
            "https://arxiv.org/abs/2408.07990",
            "θ = θ_0 + Σ_{agree} c_i τ̂_i / Σ_{agree} c_i, τ̂ top-variance entries, c_i ∝ mean τ̂_i²",
            selection.sce,
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
            selection.ram,
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
            selection.ramplus_tl,
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
        MethodDescription(
            "passthrough",
            "Passthrough",
            "https://github.com/arcee-ai/mergekit",
            "θ = scale · θ_1",
            passthrough,
            (ParamSpec("scale", "float", "model", 1.0, "factor on the model's tensor"),),
            base="none",
            models=(1, 1),
            terms=passthrough_terms,
            row_splittable=True,
            checks_finite=True,
        ),
        MethodDescription(
            "fisher",
            "Fisher merging (recycler)",
            "https://arxiv.org/abs/2111.09832",
            "θ = Σ w_i F_i θ_i / Σ w_i F_i (F_i: diagonal Fisher from `recycler fisher`)",
            fisher,
            (_weight(),),
            base="none",
            models=(1, None),
            row_splittable=True,
            needs_fishers=True,
        ),
    ]
}
