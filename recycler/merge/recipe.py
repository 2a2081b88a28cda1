"""A merge recipe: mergekit's YAML format, read, validated and written.

    merge_method: ties
    base_model: zoo/base
    models:
      - model: zoo/checkpoints/a
        parameters: {weight: 0.6, density: 0.5}
      - model: zoo/checkpoints/b
        parameters:
          weight: [{filter: self_attn, value: 0.2}, {value: 0.4}]
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16

A parameter is a number, a gradient (a list of numbers interpolated across the
layers; tensors outside the layers take the first) or a list of `{filter, value}`
entries (the first whose filter is a substring of the tensor name wins; no filter,
or `"*"`, matches every tensor). A model's own parameter wins; where it is absent,
or none of its filters matches, the top-level `parameters` entry applies, as in
mergekit. recycler's
own additions: `random_seed` (seeds DARE's masks), and the methods `fisher` and
the weight schemes of `weights.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from recycler.errors import RecyclerError
from recycler.pool.safetensors_file import torch_dtype
from recycler.yaml_file import load_yaml

if TYPE_CHECKING:
    import torch

# A recipe's dtype names -> safetensors dtype codes.
DTYPES: dict[str, str] = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}
_TOP_LEVEL_KEYS = {
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "random_seed",
    "name",
}
_MODEL_PARAMS = {"weight", "density"}
_GLOBAL_PARAMS = {"weight", "density", "normalize", "lambda", "int8_mask", "rescale"}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class FilterValue:
    """One entry of a conditional parameter; `filter=None` matches every tensor."""

    filter: str | None
    value: float


Param = float | tuple[float, ...] | tuple[FilterValue, ...]


@dataclass
class ModelSpec:
    model: str
    weight: Param | None = None
    density: Param | None = None


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str = "bfloat16"
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    random_seed: int = 0

    # ---- reading -----------------------------------------------------------------
    @classmethod
    def from_yaml_file(cls, path: Path) -> Recipe:
        return cls.from_dict(load_yaml(path, "recipe"), where=str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecyclerError(f"{where}: expected a mapping with merge_method and models")
        if "slices" in data:
            raise RecyclerError(f"{where}: slices: not supported; list whole models under models:")
        for key in data:
            if key not in _TOP_LEVEL_KEYS:
                raise RecyclerError(
                    f"{where}: {key}: unknown key (known: {', '.join(sorted(_TOP_LEVEL_KEYS))})"
                )
        method = data.get("merge_method")
        if not isinstance(method, str):
            raise RecyclerError(f"{where}: merge_method: missing")
        models_raw = data.get("models")
        if not isinstance(models_raw, list) or not models_raw:
            raise RecyclerError(f"{where}: models: must be a non-empty list")
        models = [_model_spec(entry, f"{where}: models[{i}]") for i, entry in enumerate(models_raw)]
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecyclerError(f"{where}: parameters: must be a mapping")
        for key, value in params.items():
            if key not in _GLOBAL_PARAMS:
                raise RecyclerError(
                    f"{where}: parameters.{key}: unknown parameter (known: {', '.join(sorted(_GLOBAL_PARAMS))})"
                )
            if key in {"normalize", "int8_mask", "rescale"}:
                if not isinstance(value, bool):
                    raise RecyclerError(
                        f"{where}: parameters.{key}: must be true or false, got {value!r}"
                    )
            else:
                params[key] = _param(value, f"{where}: parameters.{key}")
        base = data.get("base_model")
        if base is not None and not isinstance(base, (str, dict)):
            raise RecyclerError(f"{where}: base_model: must be a path")
        seed = data.get("random_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RecyclerError(f"{where}: random_seed: must be an integer, got {seed!r}")
        recipe = cls(
            merge_method=method,
            models=models,
            base_model=_model_path(base, f"{where}: base_model") if base is not None else None,
            parameters=dict(params),
            dtype=str(data.get("dtype", "bfloat16")),
            out_dtype=str(data["out_dtype"]) if data.get("out_dtype") is not None else None,
            tokenizer_source=str(data["tokenizer_source"])
            if data.get("tokenizer_source") is not None
            else None,
            random_seed=seed,
        )
        recipe.validate(where)
        return recipe

    def validate(self, where: str = "recipe") -> None:
        from recycler.merge.methods import METHODS

        if self.merge_method not in METHODS:
            raise RecyclerError(
                f"{where}: merge_method: unknown method {self.merge_method!r} (known: {', '.join(METHODS)})"
            )
        method = METHODS[self.merge_method]
        if not self.models:
            raise RecyclerError(f"{where}: models: must be a non-empty list")
        if method.needs_base and self.base_model is None:
            raise RecyclerError(f"{where}: base_model: {self.merge_method} needs a base model")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise RecyclerError(
                    f"{where}: {key}: unknown dtype {value!r} (known: {', '.join(DTYPES)})"
                )
        for i, spec in enumerate(self.models):
            for value in _values(spec.density):
                if not 0.0 < value <= 1.0:
                    raise RecyclerError(
                        f"{where}: models[{i}].parameters.density: must be in (0, 1], got {value}"
                    )
            for value in _values(spec.weight):
                if not math.isfinite(value):
                    raise RecyclerError(
                        f"{where}: models[{i}].parameters.weight: must be finite, got {value}"
                    )
        for value in _values(self.parameters.get("density")):
            if not 0.0 < value <= 1.0:
                raise RecyclerError(f"{where}: parameters.density: must be in (0, 1], got {value}")
        lam = self.parameters.get("lambda", 1.0)
        if any(not math.isfinite(v) for v in _values(lam)):
            raise RecyclerError(f"{where}: parameters.lambda: must be finite")
        if self.normalize and _weights_can_sum_to_zero(self):
            raise RecyclerError(
                f"{where}: models: the weights sum to zero, which normalize cannot divide by"
            )

    # ---- per-tensor values ---------------------------------------------------------
    @property
    def normalize(self) -> bool:
        from recycler.merge.methods import METHODS

        default = (
            METHODS[self.merge_method].default_normalize if self.merge_method in METHODS else False
        )
        return bool(self.parameters.get("normalize", default))

    @property
    def out_code(self) -> str:
        """The merged tensors' safetensors dtype code."""
        return DTYPES[self.out_dtype or self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.out_code)

    def _model_value(self, spec: ModelSpec, key: str, tensor_name: str, n_layers: int) -> float:
        for source in (getattr(spec, key), self.parameters.get(key)):
            value = resolve(source, tensor_name, n_layers)
            if value is not None:
                return value
        return 1.0  # weight, density and lambda all default to 1

    def weights_for(self, tensor_name: str, n_layers: int) -> list[float]:
        return [self._model_value(s, "weight", tensor_name, n_layers) for s in self.models]

    def densities_for(self, tensor_name: str, n_layers: int) -> list[float]:
        return [self._model_value(s, "density", tensor_name, n_layers) for s in self.models]

    def lambda_for(self, tensor_name: str, n_layers: int) -> float:
        value = resolve(self.parameters.get("lambda"), tensor_name, n_layers)
        return 1.0 if value is None else value

    # ---- writing -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        models = []
        for spec in self.models:
            entry: dict[str, Any] = {"model": spec.model}
            params = {
                k: _param_to_yaml(v)
                for k in ("weight", "density")
                if (v := getattr(spec, k)) is not None
            }
            if params:
                entry["parameters"] = params
            models.append(entry)
        out["models"] = models
        params = {
            k: (v if isinstance(v, bool) else _param_to_yaml(v)) for k, v in self.parameters.items()
        }
        if params:
            out["parameters"] = params
        out["dtype"] = self.dtype
        if self.out_dtype is not None:
            out["out_dtype"] = self.out_dtype
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        if self.random_seed:
            out["random_seed"] = self.random_seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def resolve(value: Param | None, tensor_name: str, n_layers: int) -> float | None:
    """The value of a parameter for one tensor; None where it is unset or no filter matches."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value and isinstance(value[0], FilterValue):
        for entry in value:
            assert isinstance(entry, FilterValue)
            if entry.filter in (None, "*") or entry.filter in tensor_name:
                return entry.value
        return None
    return _gradient(
        [float(v) for v in value if isinstance(v, (int, float))], tensor_name, n_layers
    )


def _gradient(points: list[float], tensor_name: str, n_layers: int) -> float:
    """A list of numbers spread evenly over the layers (t = layer / (L − 1)), linearly
    interpolated; tensors outside the layer stack take t = 0, the first value."""
    if len(points) == 1:
        return points[0]
    match = _LAYER_INDEX.search(tensor_name)
    if match is None:
        return points[0]
    t = int(match.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0
    x = t * (len(points) - 1)
    i = min(int(x), len(points) - 2)
    return points[i] + (points[i + 1] - points[i]) * (x - i)


def _values(value: Param | None) -> list[float]:
    if value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    return [e.value if isinstance(e, FilterValue) else float(e) for e in value]


def _weights_can_sum_to_zero(recipe: Recipe) -> bool:
    """With normalize, weights that sum to zero have no defined merge.

    Checked here for every filter the recipe names and for the unfiltered default;
    the engine checks each tensor again as it merges it.
    """
    probes = [""]
    for w in [*(spec.weight for spec in recipe.models), recipe.parameters.get("weight")]:
        if isinstance(w, tuple):
            probes += [e.filter for e in w if isinstance(e, FilterValue) and e.filter]
    return any(abs(sum(recipe.weights_for(p, 1))) < 1e-12 for p in probes)


def _model_spec(entry: Any, where: str) -> ModelSpec:
    if isinstance(entry, str):
        return ModelSpec(model=entry)
    if not isinstance(entry, dict) or "model" not in entry:
        raise RecyclerError(f"{where}: expected a mapping with model:")
    for key in entry:
        if key not in {"model", "parameters"}:
            raise RecyclerError(f"{where}.{key}: unknown key (known: model, parameters)")
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecyclerError(f"{where}.parameters: must be a mapping")
    for key in params:
        if key not in _MODEL_PARAMS:
            raise RecyclerError(
                f"{where}.parameters.{key}: unknown parameter (known: weight, density)"
            )
    return ModelSpec(
        model=_model_path(entry["model"], f"{where}.model"),
        weight=_param(params["weight"], f"{where}.parameters.weight")
        if "weight" in params
        else None,
        density=_param(params["density"], f"{where}.parameters.density")
        if "density" in params
        else None,
    )


def _model_path(value: Any, where: str) -> str:
    if (
        isinstance(value, dict)
        and isinstance(value.get("model"), dict)
        and "path" in value["model"]
        and not value.get("lora")
    ):
        value = value["model"]["path"]  # mergekit's long form {model: {path: ...}}
    if not isinstance(value, str) or not value:
        raise RecyclerError(f"{where}: must be a path, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise RecyclerError(
            f"{where}: 'model+lora' is not supported; list the LoRA adapter dir itself as a model"
        )
    return value


def _param(value: Any, where: str) -> Param:
    if _is_number(value):
        return float(value)
    if isinstance(value, list) and value:
        if all(_is_number(v) for v in value):
            return tuple(float(v) for v in value)
        if all(isinstance(v, dict) for v in value):
            entries = []
            for j, v in enumerate(value):
                if set(v) - {"filter", "value"} or "value" not in v or not _is_number(v["value"]):
                    raise RecyclerError(
                        f"{where}[{j}]: expected {{filter: NAME, value: NUMBER}}, got {v!r}"
                    )
                entries.append(
                    FilterValue(
                        str(v["filter"]) if v.get("filter") is not None else None, float(v["value"])
                    )
                )
            return tuple(entries)
    raise RecyclerError(f"{where}: not a number: {value!r}")


def _param_to_yaml(value: Param) -> Any:
    if isinstance(value, (int, float)):
        return float(value)
    return [
        ({"filter": e.filter, "value": e.value} if e.filter is not None else {"value": e.value})
        if isinstance(e, FilterValue)
        else float(e)
        for e in value
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
