"""Weighted sums of the models' tensors: linear (model soup), task arithmetic and
passthrough, each one linear combination per tensor (its `terms`: the C kernel and the
file-to-file export serve it), and Fisher merging (a weighted mean with per-entry weights).

Each method's description stands beside its function; `methods.METHODS` collects them.
Notation (every merge module's): versions θ_1..θ_n, base θ_0, task vectors
τ_i = θ_i − θ_0, weights w_i, per-model density d_i. Semantics and parameter names follow
mergekit 0.1.5 (`normalize` defaults included), so the same recipe gives the same tensors;
where recycler differs on purpose, the description's `differs` says how and why. Every
method accumulates in fp32, whatever the stored dtype, and casts once at the end.

PyTorch is imported inside the functions that need it, not with the module: the
registry is read by recipe checks and by file-to-file merges that run without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from recycler.merge.description import (
    INT8_MASK,
    UNIT,
    LinearTerms,
    MergeInputs,
    MethodDescription,
    ParamSpec,
    TensorParams,
    normalize_param,
    weight_param,
)
from recycler.merge.kernel import linear_combination

if TYPE_CHECKING:
    import torch


def normalized_weights(weights: Sequence[float], normalize: bool) -> list[float]:
    """The weights, divided by their sum where `normalize` (ZeroDivisionError if it is ~0)."""
    total = sum(weights)
    if normalize:
        if abs(total) < 1e-12:
            raise ZeroDivisionError("weights sum to zero")
        return [w / total for w in weights]
    return list(weights)


def linear_terms(weights: Sequence[float], normalize: bool, lambda_: float) -> LinearTerms:
    """Weighted average (model soup; Wortsman et al. 2022): θ = Σ w_i θ_i [/ Σ w_i if normalize]."""
    return LinearTerms(normalized_weights(weights, normalize))


def task_arithmetic_terms(weights: Sequence[float], normalize: bool, lambda_: float) -> LinearTerms:
    """Task arithmetic (Ilharco et al. 2023): θ = θ_0 + λ Σ w_i τ_i [/ Σ w_i if normalize].

    Computed as the equivalent linear combination (1 − λ Σ w_i) θ_0 + Σ λ w_i θ_i,
    so no task vector is materialised.
    """
    w = [lambda_ * x for x in normalized_weights(weights, normalize)]
    return LinearTerms(w, base=1.0 - sum(w))


def passthrough_terms(p: TensorParams) -> LinearTerms:
    """Passthrough: the one model's tensor, times its `scale`."""
    return LinearTerms([float(p.per_model.get("scale", [1.0])[0])])


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


def passthrough(inp: MergeInputs) -> torch.Tensor:
    return apply_terms(passthrough_terms(inp.params), inp.versions, None, inp.out_dtype)


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


# ---- the parameters of mergekit's generalized task arithmetic family ------------------
# (task arithmetic here, TIES, DARE, Breadcrumbs and DELLA in `ties_family`)
DENSITY = ParamSpec(
    "density", "float", "model", 1.0, "fraction d_i of τ_i's entries kept", UNIT, tune=(0.1, 1.0)
)
LAMBDA = ParamSpec(
    "lambda", "float", "tensor", 1.0, "scale λ of the merged task vector", tune=(0.5, 1.5)
)


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec(
        "rescale", "bool", "recipe", default, "scale the kept entries back up (see the method)"
    )


def task_arithmetic_params(
    normalize: bool, rescale: bool, *extra: ParamSpec, sparse: bool = True
) -> tuple[ParamSpec, ...]:
    """The parameters of mergekit's generalized task arithmetic family."""
    return (
        weight_param(),
        *((DENSITY,) if sparse else ()),
        *extra,
        normalize_param(normalize),
        LAMBDA,
        _rescale(rescale),
        INT8_MASK,
    )


DESCRIPTIONS = (
    MethodDescription(
        "linear",
        "Linear (model soup)",
        "https://arxiv.org/abs/2203.05482",
        "θ = Σ w_i θ_i [/ Σ w_i]",
        linear,
        (weight_param(), normalize_param(True)),
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
        task_arithmetic_params(False, False, sparse=False),
        base="required",
        models=(1, None),
        terms=lambda p: task_arithmetic_terms(p.weights, p.normalize, p.lambda_),
        row_splittable=True,
        checks_finite=True,
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
        (weight_param(),),
        base="none",
        models=(1, None),
        row_splittable=True,
        needs_fishers=True,
    ),
)
