"""An independent reference for recycler's merge methods, written from the papers.

Nothing here imports recycler: it reads a mergekit-style recipe (a plain dict
from YAML) and the checkpoints' safetensors files itself and computes each merged
tensor in float64, so that the engine (fp32 accumulation) and mergekit can both
be checked against it. Sources (see shared/METHODS.md):

- linear / model soup (Wortsman et al. 2022): θ = Σ w_i θ_i, / Σ w_i when normalize.
- task arithmetic (Ilharco et al. 2023): θ = θ_0 + λ Σ w_i τ_i, τ_i = θ_i − θ_0
  (/ Σ w_i when normalize).
- TIES (Yadav et al. 2023): trim each τ_i to its top-k magnitudes per tensor
  (k = max(1, int(density · numel))), elect γ = sign(Σ w_i τ̂_i) (0 counts as +),
  disjoint sum of the w_i τ̂_i whose sign equals γ, / Σ of the agreeing w_i when
  normalize, then θ_0 + λ τ_m.
- DARE (Yu et al. 2023): keep each entry of τ_i with probability density, rescale
  kept entries by 1/density, then task arithmetic (dare_linear) or TIES election
  (dare_ties). A random method cannot be compared entry by entry, so for it the
  reference enumerates every keep/drop pattern of the n models (`dare_candidates`)
  and a test checks that each merged entry is one of them.

Parameter resolution follows mergekit's recipe semantics: a parameter is looked
up in the model's `parameters`, then in the recipe's `parameters`; a value may be
a scalar, a gradient list (interpolated over t = layer / (n_layers − 1), t = 0
for tensors outside the layers), or a list of {filter, value} whose first entry
with filter None, "*" or a substring of the tensor name applies.

Defaults (mergekit 0.1.5): normalize true for linear and ties, false for
task_arithmetic, dare_linear and dare_ties; lambda 1; density 1.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

NORMALIZE_DEFAULT = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": False,
}
NEEDS_BASE = {"task_arithmetic", "ties", "dare_linear", "dare_ties"}
TRIMMED = {"ties"}
DROPPED = {"dare_linear", "dare_ties"}
ELECTED = {"ties", "dare_ties"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF model dir (single file or shards) or a bare .safetensors file."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(str(path / name)))
    return out


def n_layers(path: str | Path) -> int:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return 0
    return int(json.loads(cfg.read_text()).get("num_hidden_layers", 0))


def layer_t(tensor_name: str, num_layers: int) -> float:
    """mergekit's gradient position: layer i of L → i / (L − 1); other tensors → 0."""
    m = _LAYER.search(tensor_name)
    if m is None or num_layers <= 0:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A scalar, a gradient list, or a list of {filter, value}; None when no filter matches."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, bool | int | float | str):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, bool | int | float) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
        if all(isinstance(e, bool | int | float | str) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in tensor_name:
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    raise ValueError(f"cannot read parameter setting {setting!r}")


def resolve(
    name: str, scopes: Sequence[Mapping[str, Any] | None], tensor_name: str, t: float, default: Any
) -> Any:
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    if default is _REQUIRED:
        raise ValueError(f"missing parameter {name} for {tensor_name}")
    return default


_REQUIRED = object()


@dataclass
class Inputs:
    """One tensor's versions, as float64, and the resolved parameters."""

    name: str
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    weights: list[float]
    densities: list[float]
    normalize: bool
    lam: float


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density · numel)) largest magnitudes (ties at the threshold
    are kept here; `trim_ambiguous` marks them, since any implementation may break them)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    mags = delta.abs().reshape(-1)
    kth = torch.topk(mags, k).values[-1]
    return (delta.abs() >= kth) if k < delta.numel() else torch.ones_like(delta, dtype=torch.bool)


def trim_ambiguous(delta: torch.Tensor, density: float, rel: float) -> torch.Tensor:
    """Entries whose magnitude is within `rel` (relative) of the k-th largest: an
    implementation that rounds the delta differently, or breaks ties otherwise, may
    keep or drop them."""
    if density >= 1:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    mags = delta.abs().reshape(-1)
    kth = torch.topk(mags, k).values[-1]
    return ((delta.abs() - kth).abs() <= rel * kth.abs()).reshape(delta.shape)


def combine(
    method: str,
    base: torch.Tensor | None,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool,
    lam: float,
    tensors: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The shared last step: linear, task arithmetic, or TIES election + disjoint merge."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    if method == "linear":
        assert tensors is not None
        stack = torch.stack(list(tensors))
        wb = w.reshape(-1, *([1] * (stack.ndim - 1)))
        out = (stack * wb).sum(0)
        return out / w.sum() if normalize else out
    assert base is not None
    stack = torch.stack(list(deltas))
    wb = w.reshape(-1, *([1] * (stack.ndim - 1)))
    weighted = stack * wb
    if method in ELECTED:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(torch.float64)
        agree = torch.sign(weighted) == elected
        mixed = (weighted * agree).sum(0)
        divisor = (wb * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(0)
        divisor = w.sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


@dataclass
class Result:
    out: torch.Tensor  # float64
    ambiguous: torch.Tensor  # bool, entries a correct implementation may legitimately differ on
    decisions: torch.Tensor  # bool [k, *shape]: TIES keep masks per model + elected sign >= 0


@dataclass
class Recipe:
    method: str
    models: list[str]
    model_params: list[Mapping[str, Any]]
    base: str | None
    params: Mapping[str, Any]
    dtype: str | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], root: Path | None = None) -> Recipe:
        def p(x: str) -> str:
            return str((root / x) if root is not None and not Path(x).is_absolute() else x)

        models = [m for m in d["models"]]
        return cls(
            method=d["merge_method"],
            models=[p(m["model"]) for m in models],
            model_params=[m.get("parameters") or {} for m in models],
            base=p(d["base_model"]) if d.get("base_model") else None,
            params=d.get("parameters") or {},
            dtype=d.get("dtype"),
        )


class ReferenceMerge:
    """Loads a recipe's checkpoints once; merges tensor by tensor in float64."""

    def __init__(self, recipe: Mapping[str, Any] | Recipe, root: Path | None = None) -> None:
        self.recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe, root)
        r = self.recipe
        if r.method not in NORMALIZE_DEFAULT:
            raise ValueError(f"reference: unknown method {r.method}")
        if r.method in NEEDS_BASE and r.base is None:
            raise ValueError(f"reference: {r.method} needs a base model")
        self.ckpts = [load_checkpoint(m) for m in r.models]
        self.base = load_checkpoint(r.base) if r.base else None
        self.n_layers = n_layers(r.base or r.models[0])
        self.names = list(self.ckpts[0])

    def inputs(self, name: str, compute_dtype: torch.dtype | None = None) -> Inputs:
        r = self.recipe
        t = layer_t(name, self.n_layers)
        weights = [
            float(resolve("weight", [mp, r.params], name, t, _REQUIRED)) for mp in r.model_params
        ]
        densities = [
            float(resolve("density", [mp, r.params], name, t, 1.0)) for mp in r.model_params
        ]
        normalize = bool(resolve("normalize", [r.params], name, t, NORMALIZE_DEFAULT[r.method]))
        lam = float(resolve("lambda", [r.params], name, t, 1.0))

        def read(x: torch.Tensor) -> torch.Tensor:
            return (x.to(compute_dtype) if compute_dtype is not None else x).to(torch.float64)

        base = read(self.base[name]) if self.base is not None else None
        tensors = [read(c[name]) for c in self.ckpts]
        return Inputs(name, base, tensors, weights, densities, normalize, lam)

    def coefficient_scale(self, name: str) -> torch.Tensor:
        """Per entry, the size of what a merge adds up: max_i |θ_i| (base included) times
        (1 + Σ_i |c_i|) with c_i each model's effective coefficient. Rounding errors of any
        order of summation are a small multiple of unit roundoff times this."""
        x = self.inputs(name)
        z = sum(x.weights) if x.normalize and abs(sum(x.weights)) >= 1e-8 else 1.0
        lam = 1.0 if self.recipe.method == "linear" else x.lam
        mags = torch.stack(
            [t.abs() for t in x.tensors] + ([x.base.abs()] if x.base is not None else [])
        )
        coef = 1 + sum(abs(lam * w / z) for w in x.weights)
        if self.recipe.method in DROPPED:
            coef = 1 + sum(abs(lam * w / z) / d for w, d in zip(x.weights, x.densities))
        return mags.amax(0) * coef

    def merge(
        self,
        name: str,
        *,
        compute_dtype: torch.dtype | None = None,
        tie_rel: float = 1e-5,
        sign_rel: float = 1e-5,
    ) -> Result:
        """Merge one tensor in float64.

        compute_dtype: round the inputs and each task vector θ_i − θ_0 to this dtype
        first, as mergekit does with a recipe's `dtype` (it computes in that dtype);
        None: exact. `ambiguous` marks entries whose TIES trim decision lies within
        `tie_rel` of the k-th magnitude (any tie-break or rounding may flip it) or whose
        sign election lies within `sign_rel` of zero. Not for DARE: see dare_candidates."""
        r = self.recipe
        x = self.inputs(name, compute_dtype)
        shape = x.tensors[0].shape
        ambiguous = torch.zeros(shape, dtype=torch.bool)
        decisions = torch.ones((0, *shape), dtype=torch.bool)
        if r.method == "linear":
            out = combine("linear", None, [], x.weights, x.normalize, 1.0, x.tensors)
            return Result(out, ambiguous, decisions)
        if r.method in DROPPED:
            raise ValueError("reference: DARE is random; use dare_candidates")
        assert x.base is not None
        deltas = [t - x.base for t in x.tensors]
        if compute_dtype is not None:
            deltas = [d.to(compute_dtype).to(torch.float64) for d in deltas]
        masks = []
        if r.method in TRIMMED:
            trimmed = []
            for d, density in zip(deltas, x.densities):
                m = topk_mask(d, density)
                masks.append(m)
                trimmed.append(d * m)
                ambiguous |= trim_ambiguous(d, density, tie_rel)
            deltas = trimmed
        out = combine(r.method, x.base, deltas, x.weights, x.normalize, x.lam)
        if r.method in ELECTED:
            w = torch.tensor(x.weights, dtype=torch.float64).reshape(-1, *([1] * len(shape)))
            weighted = torch.stack(deltas) * w
            total = weighted.sum(0)
            mass = weighted.abs().sum(0)
            ambiguous |= (total.abs() <= sign_rel * mass) & (mass > 0)
            masks.append(total >= 0)
        if masks:
            decisions = torch.stack(masks)
        return Result(out, ambiguous, decisions)

    def dare_candidates(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """For a DARE method: (candidates [2^n, *shape], keep patterns [2^n, n] bool).

        Candidate j is the merge when model i's entry is kept iff patterns[j, i]
        (kept entries rescaled by 1/density_i)."""
        r = self.recipe
        if r.method not in DROPPED:
            raise ValueError("reference: dare_candidates is for dare_linear / dare_ties")
        x = self.inputs(name)
        assert x.base is not None
        deltas = [t - x.base for t in x.tensors]
        method = "ties" if r.method == "dare_ties" else "task_arithmetic"
        patterns = list(itertools.product([False, True], repeat=len(deltas)))
        cands = []
        for pat in patterns:
            kept = [
                d / dens if keep else torch.zeros_like(d)
                for d, dens, keep in zip(deltas, x.densities, pat)
            ]
            cands.append(combine(method, x.base, kept, x.weights, x.normalize, x.lam))
        return torch.stack(cands), torch.tensor(patterns, dtype=torch.bool)

    def expected_dare(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """dare_linear's mean over masks and the variance of one entry around it:
        E = θ_0 + λ/Z Σ w_i τ_i and Var = (λ/Z)² Σ w_i² τ_i² (1 − d_i)/d_i
        (Z = Σ w_i with normalize, else 1)."""
        x = self.inputs(name)
        assert x.base is not None
        z = sum(x.weights) if x.normalize and abs(sum(x.weights)) >= 1e-8 else 1.0
        scale = x.lam / z
        mean = x.base + scale * sum(w * (t - x.base) for w, t in zip(x.weights, x.tensors))
        var = scale**2 * sum(
            w**2 * (t - x.base) ** 2 * (1 - d) / d
            for w, t, d in zip(x.weights, x.tensors, x.densities)
        )
        return mean, var
