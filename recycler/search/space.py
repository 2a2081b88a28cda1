"""The search space: Optuna parameters ⇄ merge weights ⇄ a mergekit-style Recipe.

`simplex` weights are sampled with Optuna's documented exponential trick: one
u_i ~ suggest_float(0, 1) per checkpoint, x_i = -log(u_i), w_i = x_i / Σx. The sampler
sees an unconstrained box while the weights are a flat Dirichlet; the normalised weights
are what the trial stores. `box` weights are sampled directly inside `search.bounds`.

Granularity: `model` gives one weight per checkpoint; `layers:K` one per checkpoint and
per group of consecutive layers (plus one group for the tensors outside the layer stack:
embeddings, final norm, head); `blocks` one per checkpoint for attention, MLP and the
rest. Groups become mergekit `{filter, value}` weight lists, so an exported recipe.yaml
reproduces the trial in mergekit too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.merge.description import Coupling
from recycler.merge.methods import METHODS
from recycler.search_spec import TuneSpec

# Where a transformer's layer index sits in a tensor name (Llama, GPT-2, GPT-NeoX, BERT...).
_LAYER_PREFIX = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.)")
# First filter present in the pool's names wins: attention, then MLP.
_ATTN_FILTERS = ("self_attn", "attn", "attention")
_MLP_FILTERS = ("mlp", "feed_forward", "ffn")
OTHER = "other"


class _Suggester(Protocol):
    """The slice of optuna.Trial the space needs (a real Trial satisfies it)."""

    def suggest_float(self, name: str, low: float, high: float) -> float: ...


@dataclass(frozen=True)
class Group:
    """A set of tensors sharing one weight per checkpoint; no filters = every other tensor."""

    name: str
    filters: tuple[str, ...] = ()


# A tuned value as a trial holds it: one number, or one per group of tensors.
Tuned = float | dict[str, float]


@dataclass
class Proposal:
    """One point of the space: weights[group][checkpoint index] (empty for a method that
    reads no weights) and the tuned method parameters, per group for a tensor-scope one in
    a grouped space."""

    weights: dict[str, list[float]]
    tuned: dict[str, Tuned] = field(default_factory=dict)

    def is_finite(self) -> bool:
        values = [w for ws in self.weights.values() for w in ws]
        for value in self.tuned.values():
            values.extend(value.values() if isinstance(value, dict) else [value])
        return all(math.isfinite(v) for v in values)


@dataclass(frozen=True)
class Variable:
    """One Optuna parameter of a tuned method parameter: `key` in [low, high]. A coupled
    parameter's variable is its share of what the other parameter allows (`Coupling`)."""

    key: str
    param: str
    group: str | None  # the group of tensors it sets; None: every tensor
    low: float
    high: float
    coupling: Coupling | None = None


class SearchSpace:
    """Everything needed to turn trial parameters into a Recipe, and back for baselines.

    It searches exactly what the method reads (its description says): one weight per
    checkpoint (and group) only where the method reads `weight`, and each tuned parameter,
    one value per group where the parameter is set per tensor (slerp's t)."""

    def __init__(
        self,
        spec: StudySpec,
        checkpoint_names: Sequence[str],
        checkpoint_paths: Sequence[str],
        base_path: str | None,
        tensor_names: Sequence[str],
    ) -> None:
        if len(checkpoint_names) != len(checkpoint_paths):
            raise ValueError("one path per checkpoint name")
        method = METHODS[spec.merge.method]
        with_base = base_path is not None and method.uses_base
        why = method.count_error(len(checkpoint_names), with_base, "checkpoints")
        if why is not None:
            raise RecyclerError(f"pool.checkpoints: {why}")
        self.spec = spec
        self.method = method
        self.names = list(checkpoint_names)
        self.paths = list(checkpoint_paths)
        self.base_path = base_path
        self.kind = spec.search.weights
        self.bounds = spec.search.bounds
        self.tune: list[TuneSpec] = list(spec.search.tune)
        self.groups = _make_groups(spec.search.granularity, spec.search.layer_groups, tensor_names)
        self.variables = self._variables()

    @classmethod
    def from_pool(cls, spec: StudySpec, pool: Any) -> SearchSpace:
        """From an opened recycler.pool.Pool (typed loosely: the search knows no tensors)."""
        return cls(
            spec,
            [c.name for c in pool.checkpoints],
            [str(c.path) for c in pool.checkpoints],
            str(pool.base.path) if pool.base is not None else None,
            list(pool.tensor_names),
        )

    # ---- parameter names ------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def grouped(self) -> bool:
        return len(self.groups) > 1

    @property
    def weighted(self) -> bool:
        """Whether the search samples weights: only where the method reads them."""
        return self.method.weighted

    def weight_param(self, group: str, index: int) -> str:
        name = self.names[index]
        return f"w:{name}" if not self.grouped else f"w:{group}:{name}"

    @staticmethod
    def tune_param(name: str) -> str:
        return f"p:{name}"

    def _per_group(self, name: str) -> bool:
        spec = self.method.param(name)
        return self.grouped and spec is not None and spec.scope == "tensor"

    def _variables(self) -> list[Variable]:
        out: list[Variable] = []
        for t in self.tune:
            coupling = self.method.coupling(t.name)
            if coupling is not None:
                # The share of the allowed range: every sampled point is a legal merge.
                share = t.low / t.high if t.high > 0 else 0.0
                out.append(Variable(f"share:{t.name}", t.name, None, share, 1.0, coupling))
            elif self._per_group(t.name):
                out.extend(
                    Variable(f"p:{t.name}:{g.name}", t.name, g.name, t.low, t.high)
                    for g in self.groups
                )
            else:
                out.append(Variable(self.tune_param(t.name), t.name, None, t.low, t.high))
        return out

    def param_names(self) -> list[str]:
        weights = [self.weight_param(g.name, i) for g in self.groups for i in range(self.n)]
        return (weights if self.weighted else []) + [v.key for v in self.variables]

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between runs of one study (Optuna would mix two spaces)."""
        out = {
            "checkpoints": self.names,
            "weights": self.kind,
            "bounds": list(self.bounds) if self.kind == "box" else None,
            "granularity": self.spec.search.granularity,
            "groups": [g.name for g in self.groups],
            "tune": [[t.name, t.low, t.high] for t in self.tune],
            "method": self.spec.merge.method,
        }
        if not self.weighted or any(v.key != self.tune_param(v.param) for v in self.variables):
            # A space other than weights plus one value per tuned parameter (the only one
            # before this key existed): a study searched in the old variables is refused.
            out["variables"] = self.param_names()
        return out

    # ---- sampling ---------------------------------------------------------------------
    def _range(self) -> tuple[float, float]:
        return (
            (0.0, 1.0) if self.kind == "simplex" else (float(self.bounds[0]), float(self.bounds[1]))
        )

    def suggest(self, trial: _Suggester) -> Proposal:
        """Ask the trial for every parameter (enqueued trials answer with their fixed values)."""
        low, high = self._range()
        params: dict[str, float] = {}
        if self.weighted:
            for g in self.groups:
                for i in range(self.n):
                    key = self.weight_param(g.name, i)
                    params[key] = trial.suggest_float(key, low, high)
        for v in self.variables:
            params[v.key] = trial.suggest_float(v.key, v.low, v.high)
        return self.decode(params)

    def decode(self, params: Mapping[str, float]) -> Proposal:
        """Trial parameters → weights and tuned values; simplex coordinates are normalised per
        group, a coupled parameter's share scaled to what its partner allows."""
        weights: dict[str, list[float]] = {}
        if self.weighted:
            for g in self.groups:
                raw = [float(params[self.weight_param(g.name, i)]) for i in range(self.n)]
                weights[g.name] = _from_exponential(raw) if self.kind == "simplex" else raw
        tuned: dict[str, Tuned] = {}
        for v in self.variables:
            if v.coupling is None and v.group is None:
                tuned[v.param] = float(params[v.key])
            elif v.coupling is None:
                per_group = tuned.setdefault(v.param, {})
                assert isinstance(per_group, dict)
                per_group[v.group or ""] = float(params[v.key])
        for v in self.variables:
            if v.coupling is not None:
                tuned[v.param] = float(params[v.key]) * self._coupled_high(v.coupling, tuned)
        return Proposal(weights, tuned)

    def _coupled_high(self, coupling: Coupling, tuned: Mapping[str, Tuned]) -> float:
        """The largest value a coupled parameter may take given its partner's value: its
        range's top, or just below the partner's limit where that is lower."""
        high = next(t.high for t in self.tune if t.name == coupling.param)
        partner = tuned.get(coupling.on, self.fixed_value(coupling.on))
        assert not isinstance(partner, dict)  # a coupling's partner is one value per merge
        return min(high, coupling.limit(float(partner)) * (1.0 - 1e-6))

    def fixed_value(self, name: str) -> float:
        """A parameter the search does not tune: merge.params' value, else the method's
        default."""
        if name in self.spec.merge.params:
            return float(self.spec.merge.params[name])
        spec = self.method.param(name)
        assert spec is not None and spec.default is not None
        return float(spec.default)

    def encode(
        self, weights: Sequence[float] | None, tuned: Mapping[str, float] | None = None
    ) -> dict[str, float] | None:
        """Per-checkpoint weights (the same in every group; None for a method that reads
        none) and tuned values (the same in every group; a missing one takes
        `default_tuned`) → trial params; None if outside the space.

        Simplex: u_i = exp(-n w_i / Σw) gives x_i = -log u_i ∝ w_i, so decoding returns w
        exactly; a zero weight is u = 1.
        """
        params: dict[str, float] = {}
        if self.weighted:
            if weights is None:
                return None
            values = self._encode_weights(weights)
            if values is None:
                return None
            params = {
                self.weight_param(g.name, i): values[i] for g in self.groups for i in range(self.n)
            }
        chosen = {t.name: (tuned or {}).get(t.name, self.default_tuned(t)) for t in self.tune}
        if any(not t.low <= chosen[t.name] <= t.high for t in self.tune):
            return None
        for v in self.variables:
            value = float(chosen[v.param])
            if v.coupling is not None:
                value = value / self._coupled_high(v.coupling, chosen)
                if not v.low <= value <= v.high:
                    return None
            params[v.key] = value
        return params

    def _encode_weights(self, weights: Sequence[float]) -> list[float] | None:
        if len(weights) != self.n or any(not math.isfinite(w) for w in weights):
            return None
        if self.kind == "simplex":
            total = sum(weights)
            if total <= 0 or any(w < 0 for w in weights):
                return None
            return [math.exp(-self.n * w / total) for w in weights]
        low, high = self._range()
        if any(not low <= w <= high for w in weights):
            return None
        return [float(w) for w in weights]

    def default_tuned(self, t: TuneSpec) -> float:
        """A tuned parameter's value for baselines: the method's (mergekit's) default when
        inside the range."""
        spec = self.method.param(t.name)
        midpoint = (t.low + t.high) / 2
        default = float(spec.default) if spec is not None and spec.default is not None else midpoint
        return default if t.low <= default <= t.high else midpoint

    # ---- what a trial stores, and back ------------------------------------------------
    def weights_by_checkpoint(self, proposal: Proposal) -> dict[str, Any]:
        """The user attribute: {checkpoint: w} or {checkpoint: {group: w}}; {} for a method
        that reads no weights."""
        if not self.weighted:
            return {}
        if not self.grouped:
            ws = proposal.weights[self.groups[0].name]
            return {name: ws[i] for i, name in enumerate(self.names)}
        return {
            name: {g.name: proposal.weights[g.name][i] for g in self.groups}
            for i, name in enumerate(self.names)
        }

    def stored_proposal(self, weights: Mapping[str, Any], tuned: Mapping[str, Any]) -> Proposal:
        """The proposal a trial stored as its `weights` and `tuned` user attributes."""
        by_group: dict[str, list[float]] = {}
        if self.weighted:
            for g in self.groups:
                by_group[g.name] = [
                    float(weights[n][g.name] if self.grouped else weights[n]) for n in self.names
                ]
        values: dict[str, Tuned] = {
            k: ({g: float(x) for g, x in v.items()} if isinstance(v, dict) else float(v))
            for k, v in tuned.items()
        }
        return Proposal(by_group, values)

    # ---- recipes ----------------------------------------------------------------------
    def _per_tensor(self, values: Mapping[str, float]) -> Any:
        """One value per group → mergekit's `{filter, value}` list (a number when ungrouped)."""
        if not self.grouped:
            return values[self.groups[0].name]
        out: list[dict[str, Any]] = []
        for g in self.groups:
            if g.filters:
                out.extend({"filter": f, "value": values[g.name]} for f in g.filters)
            else:
                out.append({"value": values[g.name]})
        return out

    def recipe_dict(self, proposal: Proposal) -> dict[str, Any]:
        """mergekit's YAML as a dict (models are the pool's checkpoint paths, in pool order)."""
        models: list[dict[str, Any]] = []
        for i, path in enumerate(self.paths):
            if not self.weighted:
                # a method that reads no weights (slerp, sce, ...) takes none in its recipe
                models.append({"model": path})
                continue
            weight = self._per_tensor({g: ws[i] for g, ws in proposal.weights.items()})
            models.append({"model": path, "parameters": {"weight": weight}})
        parameters: dict[str, Any] = dict(self.spec.merge.params)
        for name, value in proposal.tuned.items():
            parameters[name] = self._per_tensor(value) if isinstance(value, dict) else value
        out: dict[str, Any] = {"merge_method": self.spec.merge.method, "models": models}
        if self.base_path is not None:
            out["base_model"] = self.base_path
        if parameters:
            out["parameters"] = parameters
        out["dtype"] = self.spec.merge.dtype
        if self.method.random:
            # Random masks are seeded from the recipe, so a trial merges the same twice.
            out["random_seed"] = int(self.spec.search.seed)
        return out


def _from_exponential(us: list[float]) -> list[float]:
    """u_i in [0, 1] → x_i = -log u_i → x / Σx (a flat Dirichlet for uniform u).

    u = 0 makes x_i infinite; the weights are then their limit as those coordinates grow
    together: equal shares for the checkpoints at u = 0, nothing for the rest. Samplers
    that model the space (GP, CMA-ES) do propose the boundary, and it is a meaningful
    point (a single checkpoint, or a soup of a few). All u = 1 (Σx = 0) is the limit of
    equal coordinates: the uniform weights.
    """
    at_zero = [u <= 0 for u in us]
    if any(at_zero):
        share = 1.0 / sum(at_zero)
        return [share if z else 0.0 for z in at_zero]
    # 0.0 - log(1) is +0.0, where -log(1) would print as -0.0.
    xs = [0.0 - math.log(u) for u in us]
    total = sum(xs)
    if total == 0:
        return [1.0 / len(us)] * len(us)
    return [x / total for x in xs]


def _make_groups(granularity: str, k: int | None, tensor_names: Sequence[str]) -> list[Group]:
    # Layers come from the tensor names, not config.json: the tensors are what gets merged.
    if granularity == "model":
        return [Group("all")]
    if granularity == "blocks":
        attn = next((f for f in _ATTN_FILTERS if any(f in t for t in tensor_names)), None)
        mlp = next((f for f in _MLP_FILTERS if any(f in t for t in tensor_names)), None)
        if attn is None or mlp is None:
            raise RecyclerError(
                "search.granularity: blocks needs attention and MLP tensors; none named "
                f"{'/'.join(_ATTN_FILTERS if attn is None else _MLP_FILTERS)} in the pool"
            )
        return [Group("attn", (attn,)), Group("mlp", (mlp,)), Group(OTHER)]
    assert k is not None
    # Layer index → the exact prefix its tensors share (e.g. "model.layers.3.").
    prefixes: dict[int, str] = {}
    for t in tensor_names:
        m = _LAYER_PREFIX.match(t)
        if m:
            prefixes.setdefault(int(m.group(2)), m.group(1))
    layers = sorted(prefixes)
    if not layers:
        raise RecyclerError(
            "search.granularity: layers:K: no numbered layers found in the pool's tensor names"
        )
    if k > len(layers):
        raise RecyclerError(
            f"search.granularity: layers:{k}: the pool has only {len(layers)} layers"
        )
    groups: list[Group] = []
    size, extra = divmod(len(layers), k)
    start = 0
    for g in range(k):
        stop = start + size + (1 if g < extra else 0)
        members = layers[start:stop]
        groups.append(
            Group(f"layers{members[0]}-{members[-1]}", tuple(prefixes[i] for i in members))
        )
        start = stop
    groups.append(Group(OTHER))
    _check_filters(groups, tensor_names)
    return groups


def _check_filters(groups: Sequence[Group], tensor_names: Sequence[str]) -> None:
    """mergekit's rule (first filter that is a substring wins) must select each layer's own
    group."""
    for t in tensor_names:
        m = _LAYER_PREFIX.match(t)
        want = next((g.name for g in groups if m and m.group(1) in g.filters), OTHER)
        got = next(
            (g.name for g in groups if not g.filters or any(f in t for f in g.filters)), OTHER
        )
        if want != got:
            raise RecyclerError(
                f"search.granularity: tensor {t} would be weighted as {got}, not {want}: "
                "the layer names cannot be told apart by mergekit filters"
            )
