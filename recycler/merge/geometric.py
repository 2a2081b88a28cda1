"""Merges that read the geometry of the tensors (angles, norms, spreads), not only weights.

Each function takes one tensor's `MergeInputs` and returns its merge in `out_dtype`,
computing in fp32 (norms and dot products of whole tensors in fp64, so their rounding
does not depend on the tensor's size). The semantics and parameter names are
mergekit 0.1.5's; the formulas are in each function's doc and in its description beside
it (`DESCRIPTIONS`, collected by `methods.METHODS`).

PyTorch is imported inside the functions, as in `linear`: the registry that names these
functions is read by recipe checks and by file-to-file merges that run without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from recycler.merge.description import (
    NON_NEGATIVE,
    Bounds,
    Endpoints,
    LinearTerms,
    MergeInputs,
    MethodDescription,
    ParamSpec,
    TensorParams,
    UndefinedMerge,
    weight_param,
)
from recycler.merge.kernel import gram, linear_combination

if TYPE_CHECKING:
    import torch


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    import torch

    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


def _norm(a: torch.Tensor) -> float:
    return math.sqrt(max(_dot(a, a), 0.0))


def _endpoints(inp: MergeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ_a, θ_b) of a two-point method: the base and the model where a base is given."""
    if inp.base is not None:
        return inp.base, inp.versions[0]
    return inp.versions[0], inp.versions[1]


def slerp_coeffs(t: float, aa: float, bb: float, ab: float) -> list[float]:
    """SLERP's coefficients of (θ_a, θ_b) from t and the inner products ⟨θ_a, θ_a⟩,
    ⟨θ_b, θ_b⟩ and ⟨θ_a, θ_b⟩ (the one formula of the in-memory and file-to-file paths)."""
    na, nb = math.sqrt(max(aa, 0.0)), math.sqrt(max(bb, 0.0))
    dot = ab / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))
    if abs(dot) > 0.9995:
        return [1.0 - t, t]
    omega = math.acos(dot)
    return [
        math.sin((1.0 - t) * omega) / math.sin(omega),
        math.sin(t * omega) / math.sin(omega),
    ]


def slerp(inp: MergeInputs) -> torch.Tensor:
    """Spherical interpolation of the two whole tensors (flattened) by t:
    θ = sin((1−t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b, cos Ω = ⟨θ_a, θ_b⟩ / (‖θ_a‖ ‖θ_b‖);
    plain lerp where |cos Ω| > 0.9995 (nearly colinear)."""
    a, b = _endpoints(inp)
    g = gram([a, b]) or _torch_gram(a, b)
    coeffs = slerp_coeffs(inp.value("t", 0.5), g[0][0], g[1][1], g[0][1])
    return linear_combination([a, b], coeffs, inp.out_dtype)


def _torch_gram(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    """`kernel.gram` of two tensors where the C kernel cannot serve (a GPU, float64)."""
    import torch

    # Each endpoint widened to fp64 once for its three inner products.
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    aa, bb, ab = (float(torch.dot(x, y)) for x, y in ((a64, a64), (b64, b64), (a64, b64)))
    return [[aa, ab], [ab, bb]]


def slerp_gram_terms(p: TensorParams, inner: list[list[float]], with_base: bool) -> LinearTerms:
    """`slerp` as stored terms from its endpoints' inner products: θ_a is the base where
    it is read, else the first model."""
    c_a, c_b = slerp_coeffs(float(p.values.get("t", 0.5)), inner[0][0], inner[1][1], inner[0][1])
    return LinearTerms([c_b], c_a) if with_base else LinearTerms([c_a, c_b])


def nuslerp(inp: MergeInputs) -> torch.Tensor:
    """SLERP of two models with t = w_2 / (w_1 + w_2) (0.5 where the weights sum to ~0),
    between their task vectors when a base is given (θ_0 + slerp(τ_1, τ_2)); over the
    flattened tensor (`nuslerp_flatten`, default), else per row (default) or per column
    (`nuslerp_row_wise`). Nearly colinear vectors (|sin Ω| < 1e-8) are lerped."""
    import torch

    w = inp.weights
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    base = inp.base.float() if inp.base is not None else None
    v0, v1 = (v.float() if base is None else v.float() - base for v in inp.versions)
    shape = v0.shape
    flatten = inp.flag("nuslerp_flatten", True)
    row_wise = inp.flag("nuslerp_row_wise", False)
    if flatten:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise and v0.dim() > 1:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    sin_theta = torch.sin(theta)
    colinear = sin_theta.abs() < 1e-8
    safe = torch.where(colinear, torch.ones_like(sin_theta), sin_theta)
    curved = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / safe
    res = torch.where(colinear, (1 - t) * v0 + t * v1, curved)
    if not flatten and row_wise and res.dim() > 1:
        res = res.transpose(0, -1)
    res = res.reshape(shape)
    if base is not None:
        res = res + base
    return res.to(inp.out_dtype)


def multislerp(inp: MergeInputs) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (Goddard): unit vectors x̂_i of the
    (task-vector, where a base is given) tensors, their weighted mean direction μ, the
    weighted tangent vector Σ w_i (x̂_i − ⟨x̂_i, μ⟩ μ) mapped back by the exponential map,
    scaled by Σ w_i ‖x_i‖ (weights normalised to sum 1 by `normalize_weights`)."""
    import torch

    if len(inp.versions) == 1:
        return inp.versions[0].to(inp.out_dtype)
    eps = inp.value("eps", 1e-8)
    base = inp.base.float() if inp.base is not None else None
    xs = torch.stack(
        [(v.float() if base is None else v.float() - base).reshape(-1) for v in inp.versions]
    )
    w = torch.tensor(list(inp.weights), dtype=torch.float32)
    if inp.flag("normalize_weights", True):
        w = w / w.sum()
    norms = torch.linalg.vector_norm(xs.double(), dim=-1, keepdim=True).float()
    units = xs / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = float(torch.linalg.vector_norm(mean.double()))
    if mean_norm < eps:
        if len(inp.versions) != 2:
            raise UndefinedMerge(
                "multislerp: the weighted mean of the unit vectors is zero (antipodal inputs "
                "balanced by the weights)"
            )
        res = xs[0] * w[0] + xs[1] * w[1]
    else:
        mean = mean / mean_norm
        tangent = ((units - (units @ mean).unsqueeze(-1) * mean) * w.view(-1, 1)).sum(0)
        tn = float(torch.linalg.vector_norm(tangent.double())) + eps
        res = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
        res = res * float((norms.squeeze(-1).double() * w.double()).sum())
    res = res.view(inp.versions[0].shape)
    if base is not None:
        res = res + base
    return res.to(inp.out_dtype)


def karcher(inp: MergeInputs) -> torch.Tensor:
    """Riemannian (Karcher) mean of the directions x̂_i = x_i/‖x_i‖ of the models (and the
    base, where given, as one more point) by fixed-point iteration (≤ max_iter steps, until
    the mean tangent's norm < tol), scaled by Σ α_i ‖x_i‖; α_i are the weights normalised
    to sum 1 (mergekit: all equal, which is the default weight 1)."""
    import torch

    points = [v.float() for v in inp.versions] + (
        [inp.base.float()] if inp.base is not None else []
    )
    if len(points) == 1:
        return inp.versions[0].to(inp.out_dtype)
    weights = list(inp.weights) + ([1.0] if inp.base is not None else [])
    total = sum(weights)
    if abs(total) < 1e-12:
        raise ZeroDivisionError("weights sum to zero")
    alphas = [x / total for x in weights]
    max_iter = int(inp.value("max_iter", 10))
    tol = inp.value("tol", 1e-5)
    norms = [_norm(p) for p in points]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(points[0]).to(inp.out_dtype)
    units = [points[i] / norms[i] for i in valid]
    a_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / a_sum for i in valid]
    u = linear_combination(units, a, torch.float32)
    nu = _norm(u)
    u = units[0].clone() if nu < tol else u / nu
    for _ in range(max_iter):
        coeffs_u = 0.0
        terms: list[torch.Tensor] = []
        coeffs: list[float] = []
        for ai, ui in zip(a, units):
            dot = min(1.0, max(-1.0, _dot(u, ui)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            c = ai * theta / math.sin(theta)
            terms.append(ui)
            coeffs.append(c)
            coeffs_u -= c * dot
        if not terms:
            break
        tangent = linear_combination([u, *terms], [coeffs_u, *coeffs], torch.float32)
        nt = _norm(tangent)
        if nt < tol:
            break
        u = linear_combination([u, tangent], [math.cos(nt), math.sin(nt) / nt], torch.float32)
        nu = _norm(u)
        if nu > tol:
            u = u / nu
    scale = sum(al * n for al, n in zip(alphas, norms))
    return (u * scale).to(inp.out_dtype)


def model_stock(inp: MergeInputs) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): θ = t · mean(θ_i) + (1 − t) · θ_0 with
    t = N cos / (1 + (N − 1) cos), cos the mean pairwise cosine of the task vectors
    (whole tensors, or each row with `filter_wise`); t = 0 where 1 + (N − 1) cos ≈ 0.
    Weights are not read."""
    import torch

    assert inp.base is not None
    base = inp.base.float()
    shape = base.shape
    n = len(inp.versions)
    if inp.flag("filter_wise", False):
        width = shape[-1] if base.dim() > 0 else 1
        rows = lambda x: x.reshape(-1, width)  # noqa: E731 - a local reshape rule
    else:
        rows = lambda x: x.reshape(1, -1)  # noqa: E731
    w0 = rows(base)
    offsets = [rows(v.float()) - w0 for v in inp.versions]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dots = (offsets[i].double() * offsets[j].double()).sum(-1)
            norms = torch.linalg.vector_norm(
                offsets[i].double(), dim=-1
            ) * torch.linalg.vector_norm(offsets[j].double(), dim=-1)
            cosines.append((dots / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    # No finite estimate at the singularity: the base is kept there (mergekit's rule).
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, (n * cos) / torch.where(singular, 1.0, denominator)).float()
    mean = linear_combination(list(inp.versions), [1.0 / n] * n, torch.float32)
    return (t * rows(mean) + (1 - t) * w0).reshape(shape).to(inp.out_dtype)


def nearswap(inp: MergeInputs) -> torch.Tensor:
    """NearSwap: entry by entry, θ = w θ_1 + (1 − w) θ_0 with w = clamp(t / |θ_1 − θ_0|, 0, 1):
    the model's value where it is within t of the base's, drifting back to the base beyond."""
    assert inp.base is not None
    a = inp.base.float()
    b = inp.versions[0].float()
    w = (inp.value("t", 0.0) / (b - a).abs().clamp(min=1e-6)).clamp(0, 1)
    return (w * b + (1 - w) * a).to(inp.out_dtype)


def arcee_fusion(inp: MergeInputs) -> torch.Tensor:
    """Arcee Fusion: keep the model's change where its importance |θ_1 − θ_0| · KL(softmax θ_1 ‖
    softmax θ_0) (KL per row, over the last dimension) reaches median + 1.5 IQR of all
    importances; elsewhere the base. Quantiles are the order statistics at ⌊q (n − 1)⌋."""
    import torch

    assert inp.base is not None
    a = inp.base.float()
    b = inp.versions[0].float()
    diff = b - a
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(-1)
    importance = diff.abs() * kl.unsqueeze(-1)
    flat = importance.reshape(-1)
    n = flat.numel()
    # the index rule in fp32, as mergekit computes it
    index = (torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32) * (n - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, i + 1).values for i in index)
    threshold = median + 1.5 * (q3 - q1)  # in fp32, as mergekit rounds it
    return (a + diff * (importance >= threshold)).to(inp.out_dtype)


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

DESCRIPTIONS = (
    MethodDescription(
        "slerp",
        "SLERP",
        "https://en.wikipedia.org/wiki/Slerp",
        "θ = sin((1−t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b over whole tensors "
        "(lerp if |cos Ω| > 0.9995)",
        slerp,
        (T_SLERP,),
        base="optional",
        models=(2, 2),
        models_with_base=(1, 1),
        differs=(
            "without a base the first model is t = 0 (mergekit requires the base); "
            "‖·‖ and cos Ω in fp64"
        ),
        gram_terms=slerp_gram_terms,
        checks_finite=True,  # linear_combination raises NonFiniteError
        endpoints=Endpoints("t", 0.0, 1.0),
    ),
    MethodDescription(
        "nuslerp",
        "NuSLERP",
        "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        "slerp(τ_1, τ_2) or slerp(θ_1, θ_2) with t = w_2/(w_1 + w_2), "
        "whole tensor, per row or per column",
        nuslerp,
        (
            weight_param(),
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
        multislerp,
        (
            weight_param(),
            ParamSpec("normalize_weights", "bool", "recipe", True, "weights divided by their sum"),
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
        karcher,
        (
            weight_param("weight α_i of the model (normalised; mergekit: all equal, the default)"),
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
        model_stock,
        (ParamSpec("filter_wise", "bool", "recipe", False, "one t per row instead of per tensor"),),
        base="required",
        models=(2, None),
    ),
    MethodDescription(
        "nearswap",
        "NearSwap",
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        "θ = w θ_1 + (1 − w) θ_0, w = clamp(t / |θ_1 − θ_0|, 0, 1) per entry",
        nearswap,
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
        arcee_fusion,
        (),
        base="required",
        models=(1, 1),
        differs=(
            "quantiles are exact (mergekit samples 10⁶ entries at random, unseeded, "
            "above that size)"
        ),
    ),
)
