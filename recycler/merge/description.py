"""What a merge method is, in one place: the description every other part of recycler reads.

A `MethodDescription` says, for one method: its formula and source; its parameters
(`ParamSpec`: type, default, the range a search may tune it over, and its scope);
its input contract (base required / optional / none, how many models); whether it is
one linear combination per tensor (then the C kernel and the file-to-file export serve
it); whether a block of a tensor's rows merges on its own (then shard workers may split
the tensor); whether it is random and how it is seeded. Recipe checks, study checks, the
search space, the shard plan, the workers, the export and the docs all read these. Each
description stands beside its method's function (`linear`, `ties_family`, `geometric`,
`selection`); the registry that collects them is `recycler.merge.methods.METHODS`.

Parameter scopes follow mergekit's recipe format:

- `recipe`: one value for the whole merge (a switch such as `normalize`, an iteration
  count), set under the top-level `parameters:`;
- `tensor`: one value per tensor, set under the top-level `parameters:` as a number, a
  layer gradient or a `{filter, value}` list (`t` of slerp, `lambda`);
- `model`: one value per model and tensor, set under a model's `parameters:` (or once
  under the top-level `parameters:` for every model), e.g. `weight`, `density`.

No PyTorch here: recipe and study checks read the descriptions without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Scope = Literal["recipe", "tensor", "model"]
Kind = Literal["float", "int", "bool"]
BaseUse = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class Bounds:
    """An interval of allowed values; `None` ends are unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )

    def __str__(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        opening = "(" if self.low_open or self.low is None else "["
        closing = ")" if self.high_open or self.high is None else "]"
        return f"{opening}{lo}, {hi}{closing}"


FINITE = Bounds()
UNIT = Bounds(0.0, 1.0, low_open=True)  # (0, 1]: densities, fractions kept
NON_NEGATIVE = Bounds(0.0)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: Kind
    scope: Scope
    default: float | bool | None  # None: the recipe must set it
    doc: str
    bounds: Bounds = FINITE
    tune: tuple[float, float] | None = (
        None  # the default range of `search.tune`; None: not searchable
    )

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class TensorParams:
    """One tensor's parameter values: `values` (recipe and tensor scope) and `per_model`."""

    values: Mapping[str, float | bool] = field(default_factory=dict)
    per_model: Mapping[str, Sequence[float]] = field(default_factory=dict)

    @property
    def weights(self) -> list[float]:
        return list(self.per_model.get("weight", ()))

    @property
    def normalize(self) -> bool:
        return bool(self.values.get("normalize", False))

    @property
    def lambda_(self) -> float:
        return float(self.values.get("lambda", 1.0))


@dataclass(frozen=True)
class Endpoints:
    """Values of a tensor-scope parameter at which the merge is one of its two inputs:
    `first` gives the base (or, without a base, the first model), `last` the other model.
    A search's `singles` baselines of a method that reads no weights are these."""

    param: str
    first: float
    last: float


@dataclass(frozen=True)
class Coupling:
    """`param` is legal only below a bound that the value of per-model parameter `on` sets
    (della: density ± epsilon inside (0, 1)). A search samples `param` as a share of what
    `on` allows, so every point of a default range merges; the recipe checks it as a
    `ModelRule` (`model_rule`), from the same `limit`."""

    param: str
    on: str
    limit: Callable[[float], float]  # the exclusive upper bound of `param` given `on`
    rule: str  # the constraint in words, a format string of `on` and `value`

    def why_not(self, on: float, value: float) -> str | None:
        """Why `value` of `param` does not fit `on`'s value, or None where it does."""
        return None if value < self.limit(on) else self.rule.format(on=on, value=value)

    @property
    def model_rule(self) -> ModelRule:
        return ModelRule((self.on, self.param), self.why_not)


class UndefinedMerge(ValueError):
    """The method has no defined result for this tensor's inputs (the message says why)."""


@dataclass(frozen=True)
class MergeInputs:
    """Everything a method needs for one tensor (or a block of its rows)."""

    versions: Sequence[torch.Tensor]  # one per model, stored dtype, same shape
    weights: Sequence[float]
    base: torch.Tensor | None
    out_dtype: torch.dtype
    normalize: bool = False
    lambda_: float = 1.0
    densities: Sequence[float] = ()
    # Random methods draw from generators keyed by (seed_key, model index, row block),
    # so a merge reproduces bit for bit however the tensor's rows are split.
    seed_key: str = ""
    row_offset: int = 0
    fishers: Sequence[torch.Tensor] = ()
    params: TensorParams = field(default_factory=TensorParams)

    def value(self, name: str, default: float) -> float:
        return float(self.params.values.get(name, default))

    def flag(self, name: str, default: bool) -> bool:
        return bool(self.params.values.get(name, default))

    def per_model(self, name: str, default: float) -> list[float]:
        values = self.params.per_model.get(name)
        return list(values) if values is not None else [default] * len(self.versions)


@dataclass(frozen=True)
class LinearTerms:
    """A merge that is one linear combination: Σ c_i θ_i (+ c_0 θ_0 when `base` is set)."""

    versions: list[float]
    base: float | None = None


@dataclass(frozen=True)
class ModelRule:
    """A constraint on several per-model parameters of one model, taken together.

    `why_not` gets the values of `params` (in that order) and says why they do not fit,
    or returns None where they do.
    """

    params: tuple[str, ...]
    why_not: Callable[..., str | None]

    def check(self, values: Mapping[str, float]) -> str | None:
        return self.why_not(*(values[name] for name in self.params))


@dataclass(frozen=True)
class MethodDescription:
    name: str
    title: str
    source: str  # paper or page the semantics come from
    formula: str  # one line, in the notation of methods.py's module doc
    fn: Callable[[MergeInputs], torch.Tensor]
    params: tuple[ParamSpec, ...]
    base: BaseUse
    models: tuple[int, int | None]  # how many models (besides the base), inclusive
    # Where the base is given and is itself one of the merged points (slerp's t = 0 end),
    # the number of models beside it; None: `models` applies either way.
    models_with_base: tuple[int, int | None] | None = None
    # For a method that is one linear combination per tensor: its coefficients. The
    # export then combines the stored tensors file to file (`engine.FileMerger`).
    terms: Callable[[TensorParams], LinearTerms] | None = None
    # For a method that is one linear combination per tensor whose coefficients depend on
    # the inputs' inner products (SLERP's angle): its coefficients from the parameters,
    # the Gram matrix of the inputs it reads ([base, *models] where it reads the base)
    # and whether the base is among them. The export then reads the inner products and
    # combines file to file too, without PyTorch.
    gram_terms: Callable[[TensorParams, list[list[float]], bool], LinearTerms] | None = None
    # True where rows [a, b) of the merge are the merge of rows [a, b) of the inputs
    # (nothing beyond the rows is read), so shard workers may split the tensor.
    row_splittable: bool = False
    # How a random method is seeded (empty: deterministic).
    seeding: str = ""
    # True where the method reads each checkpoint's diagonal Fisher (fisher.safetensors).
    needs_fishers: bool = False
    # True where the kernel raises NonFiniteError itself; otherwise the engine tests the merge.
    checks_finite: bool = False
    # Deliberate differences from mergekit 0.1.5, with the reason (README's method table).
    differs: str = ""
    # Where a parameter's values make the merge one of its inputs (slerp's t = 0 and 1):
    # the baselines a search of a method that reads no weights compares against.
    endpoints: Endpoints | None = None
    # Parameters whose legal values depend on another's (a search samples them coupled).
    couplings: tuple[Coupling, ...] = ()
    # Constraints that tie several of one model's parameters together (DELLA's
    # density ± epsilon): checked on the recipe and again per tensor as it merges.
    model_rules: tuple[ModelRule, ...] = ()

    # ---- derived facts -------------------------------------------------------------
    @property
    def random(self) -> bool:
        return bool(self.seeding)

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def uses_base(self) -> bool:
        """Whether the base's tensors are read when the pool has a base."""
        return self.base != "none"

    @property
    def linear(self) -> bool:
        return self.terms is not None

    @property
    def weighted(self) -> bool:
        """Whether the per-model `weight` changes the merge (what a search searches)."""
        return "weight" in self.param_names

    @property
    def searchable(self) -> bool:
        """Whether a search has anything to vary: weights, or a parameter with a tune range."""
        return self.weighted or bool(self.tunable)

    def coupling(self, name: str) -> Coupling | None:
        """The constraint that bounds parameter `name` by another's value, if any."""
        return next((c for c in self.couplings if c.param == name), None)

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def tunable(self) -> dict[str, tuple[float, float]]:
        return {p.name: p.tune for p in self.params if p.tune is not None}

    @property
    def default_normalize(self) -> bool:
        spec = self.param("normalize")
        return bool(spec.default) if spec is not None else False

    def model_range(self, with_base: bool) -> tuple[int, int | None]:
        if with_base and self.models_with_base is not None:
            return self.models_with_base
        return self.models

    def count_error(self, n_models: int, with_base: bool, noun: str = "models") -> str | None:
        """Why `n_models` models (beside a base when `with_base`) do not fit, or None."""
        low, high = self.model_range(with_base)
        if low <= n_models and (high is None or n_models <= high):
            return None
        want = (
            f"{low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
        )
        beside = " beside the base" if with_base and self.models_with_base is not None else ""
        noun = noun.removesuffix("s") if low == high == 1 else noun
        return f"{self.name} takes {want} {noun}{beside}, got {n_models}"


# ---- parameters several methods share, as mergekit 0.1.5 names them ------------------
def weight_param(doc: str = "the model's weight w_i") -> ParamSpec:
    return ParamSpec("weight", "float", "model", 1.0, doc)


def normalize_param(default: bool) -> ParamSpec:
    return ParamSpec(
        "normalize", "bool", "recipe", default, "divide by the sum of the (agreeing) weights"
    )


INT8_MASK = ParamSpec(
    "int8_mask", "bool", "recipe", False, "mergekit's memory switch; no effect (masks are bool)"
)


def describe_contract(m: MethodDescription) -> str:
    """The input contract in words (README table, docs)."""
    low, high = m.models
    count = f"{low}" if low == high else (f"≥ {low}" if high is None else f"{low}–{high}")
    text = f"base {m.base}; {count} model{'' if count == '1' else 's'}"
    if m.models_with_base is not None:
        wl, wh = m.models_with_base
        text += f" ({wl if wl == wh else f'{wl}–{wh}'} beside a base)"
    return text
