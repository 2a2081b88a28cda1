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

A parameter is a number (true/false for a switch), a layer gradient or a list of
`{filter, value}` entries whose values are numbers or gradients (`conditional.py`
says how each resolves per tensor, as mergekit does). A model's own parameter wins;
where it is absent, or none of its filters matches, the top-level `parameters` entry
applies, as in mergekit. Which parameters a method takes, their scope, defaults and allowed
values are the method's description (`methods.METHODS`), rules that tie a model's
parameters together (DELLA's density ± epsilon) included; a parameter the method
does not take is an error. As in mergekit, a model listed again as the base model
of a method that reads the base is the base (it is dropped from `models`).
recycler's own additions: `random_seed` (seeds the random methods' masks), and the
method `fisher` and the weight schemes of `weights.py`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from recycler.errors import RecyclerError
from recycler.merge.conditional import (
    FilterValue,
    Param,
    filters_of,
    parse,
    resolve,
    setting_to_yaml,
    values_of,
)
from recycler.merge.description import MethodDescription, ParamSpec, TensorParams
from recycler.merge.methods import METHODS
from recycler.merge.tokenizer_choice import KEYS as TOKENIZER_KEYS
from recycler.merge.tokenizer_choice import read_tokenizer_keys
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
# The top-level keys of any recipe besides its layout (`models:` here, `slices:` in slices.py).
SHARED_TOP_KEYS = frozenset(
    {
        "merge_method",
        "base_model",
        "parameters",
        "dtype",
        "out_dtype",
        "random_seed",
        "name",
        *TOKENIZER_KEYS,
    }
)
_TOP_LEVEL_KEYS = SHARED_TOP_KEYS | {"models"}
__all__ = ["DTYPES", "SHARED_TOP_KEYS", "FilterValue", "ModelSpec", "Param", "Recipe", "resolve"]


@dataclass
class ModelSpec:
    model: str
    weight: Param | None = None
    density: Param | None = None
    params: dict[str, Param] = field(
        default_factory=dict
    )  # the method's other per-model parameters

    def get(self, key: str) -> Param | None:
        if key in ("weight", "density"):
            value: Param | None = getattr(self, key)
            return value
        return self.params.get(key)


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
    chat_template: str | None = None  # Jinja text written with the tokenizer
    # The output layer this recipe's first layer becomes (a slice of a `slices:` recipe,
    # merged on its own): layer gradients count from it. Not part of the YAML.
    first_layer: int = 0

    # ---- reading -----------------------------------------------------------------
    @classmethod
    def from_yaml_file(cls, path: Path) -> Recipe:
        return cls.from_dict(load_yaml(path, "recipe"), where=str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecyclerError(f"{where}: expected a mapping with merge_method and models")
        if "slices" in data:
            raise RecyclerError(
                f"{where}: slices: one model of one shape is expected here; a slices recipe "
                "is merged by `recycler merge` (recycler.merge.slices)"
            )
        for key in data:
            if key not in _TOP_LEVEL_KEYS:
                raise RecyclerError(
                    f"{where}: {key}: unknown key (known: {', '.join(sorted(_TOP_LEVEL_KEYS))})"
                )
        method_name = data.get("merge_method")
        if not isinstance(method_name, str):
            raise RecyclerError(f"{where}: merge_method: missing")
        method = _method(method_name, where)
        models_raw = data.get("models")
        if not isinstance(models_raw, list) or not models_raw:
            raise RecyclerError(f"{where}: models: must be a non-empty list")
        models = [
            _model_spec(entry, f"{where}: models[{i}]", method)
            for i, entry in enumerate(models_raw)
        ]
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecyclerError(f"{where}: parameters: must be a mapping")
        params = {
            key: _global_param(method, key, value, f"{where}: parameters.{key}")
            for key, value in params.items()
        }
        base = data.get("base_model")
        if base is not None and not isinstance(base, (str, dict)):
            raise RecyclerError(f"{where}: base_model: must be a path")
        base_path = _model_path(base, f"{where}: base_model") if base is not None else None
        if base_path is not None and method.uses_base:
            # mergekit's rule: a model that is the base model is the base, not one more model.
            models = [m for m in models if m.model != base_path] or models
        tokens = read_tokenizer_keys(data, where)
        seed = data.get("random_seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RecyclerError(f"{where}: random_seed: must be an integer, got {seed!r}")
        recipe = cls(
            merge_method=method_name,
            models=models,
            base_model=base_path,
            parameters=params,
            dtype=str(data.get("dtype", "bfloat16")),
            out_dtype=str(data["out_dtype"]) if data.get("out_dtype") is not None else None,
            tokenizer_source=tokens.source,
            random_seed=seed,
            chat_template=tokens.chat_template,
        )
        recipe.validate(where)
        return recipe

    @property
    def method(self) -> MethodDescription:
        return _method(self.merge_method, "recipe")

    def validate(self, where: str = "recipe") -> None:
        method = _method(self.merge_method, where)
        if not self.models:
            raise RecyclerError(f"{where}: models: must be a non-empty list")
        if method.needs_base and self.base_model is None:
            raise RecyclerError(f"{where}: base_model: {self.merge_method} needs a base model")
        with_base = self.base_model is not None and method.uses_base
        if (why := method.count_error(len(self.models), with_base)) is not None:
            raise RecyclerError(f"{where}: models: {why}")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise RecyclerError(
                    f"{where}: {key}: unknown dtype {value!r} (known: {', '.join(DTYPES)})"
                )
        for spec in method.params:
            top = self.parameters.get(spec.name)
            if spec.scope == "model":
                for i, model in enumerate(self.models):
                    own = model.get(spec.name)
                    _check_values(spec, own, f"{where}: models[{i}].parameters.{spec.name}")
                    if spec.required and own is None and top is None:
                        raise RecyclerError(
                            f"{where}: models[{i}].parameters.{spec.name}: "
                            f"required by {self.merge_method}"
                        )
            elif spec.required and top is None:
                raise RecyclerError(
                    f"{where}: parameters.{spec.name}: required by {self.merge_method}"
                )
            if spec.kind != "bool":
                _check_values(spec, top, f"{where}: parameters.{spec.name}")
        self._check_model_rules(method, where)
        if self.normalize and "weight" in method.param_names and _weights_can_sum_to_zero(self):
            raise RecyclerError(
                f"{where}: models: the weights sum to zero, which normalize cannot divide by"
            )

    def _check_model_rules(self, method: MethodDescription, where: str) -> None:
        """The method's rules on each model's parameters, for every combination of the values
        the recipe lists (the method checks each tensor's values again as it merges)."""
        for rule in method.model_rules:
            for i, model in enumerate(self.models):
                listed = [self._listed_values(method, model, name) for name in rule.params]
                for values in itertools.product(*listed):
                    why = rule.why_not(*values)
                    if why is not None:
                        raise RecyclerError(
                            f"{where}: models[{i}].parameters.{rule.params[-1]}: {why}"
                        )

    def _listed_values(self, method: MethodDescription, model: ModelSpec, name: str) -> list[float]:
        """Every value a model's parameter takes in some tensor: its own entry, else the
        top-level one, else the default."""
        own = model.get(name)
        listed = values_of(own if own is not None else self.parameters.get(name))
        spec = method.param(name)
        default = spec.default if spec is not None else None
        return listed or ([] if default is None else [float(default)])

    # ---- per-tensor values ---------------------------------------------------------
    @property
    def normalize(self) -> bool:
        """`normalize` where no filter names the tensor (each tensor's own: `tensor_params`)."""
        value = resolve(self.parameters.get("normalize"), "", 1)
        return bool(self.method.default_normalize if value is None else value)

    @property
    def out_code(self) -> str:
        """The merged tensors' safetensors dtype code."""
        return DTYPES[self.out_dtype or self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.out_code)

    def _model_value(
        self, spec: ModelSpec, key: str, tensor_name: str, n_layers: int, default: float = 1.0
    ) -> float:
        for source in (spec.get(key), self.parameters.get(key)):
            value = resolve(source, tensor_name, n_layers, self.first_layer)
            if value is not None:
                return float(value)
        return default

    def weights_for(self, tensor_name: str, n_layers: int) -> list[float]:
        return [self._model_value(s, "weight", tensor_name, n_layers) for s in self.models]

    def tensor_params(self, tensor_name: str, n_layers: int) -> TensorParams:
        """Every parameter of the method for one tensor, defaults filled in."""
        values: dict[str, float | bool] = {}
        per_model: dict[str, list[float]] = {}
        for spec in self.method.params:
            default = spec.default
            if spec.scope == "model":
                fallback = 1.0 if default is None else float(default)
                per_model[spec.name] = [
                    self._model_value(m, spec.name, tensor_name, n_layers, fallback)
                    for m in self.models
                ]
                continue
            value = resolve(self.parameters.get(spec.name), tensor_name, n_layers, self.first_layer)
            if value is None:
                if default is None:
                    raise RecyclerError(
                        f"tensor {tensor_name}: parameters.{spec.name}: "
                        "no entry matches this tensor"
                    )
                values[spec.name] = default
            else:
                values[spec.name] = bool(value) if spec.kind == "bool" else float(value)
        return TensorParams(values, per_model)

    # ---- writing -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        models = []
        for spec in self.models:
            entry: dict[str, Any] = {"model": spec.model}
            params = {
                k: setting_to_yaml(v)
                for k in ("weight", "density")
                if (v := getattr(spec, k)) is not None
            }
            params.update({k: setting_to_yaml(v) for k, v in spec.params.items()})
            if params:
                entry["parameters"] = params
            models.append(entry)
        out["models"] = models
        params = {k: setting_to_yaml(v) for k, v in self.parameters.items()}
        if params:
            out["parameters"] = params
        out["dtype"] = self.dtype
        if self.out_dtype is not None:
            out["out_dtype"] = self.out_dtype
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        if self.random_seed:
            out["random_seed"] = self.random_seed
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _weights_can_sum_to_zero(recipe: Recipe) -> bool:
    """With normalize, weights that sum to zero have no defined merge.

    Checked here for every filter the recipe names and for the unfiltered default;
    the engine checks each tensor again as it merges it.
    """
    probes = [""]
    for w in [*(spec.weight for spec in recipe.models), recipe.parameters.get("weight")]:
        probes += filters_of(w)
    return any(abs(sum(recipe.weights_for(p, 1))) < 1e-12 for p in probes)


def _method(name: str, where: str) -> MethodDescription:
    if name not in METHODS:
        raise RecyclerError(
            f"{where}: merge_method: unknown method {name!r} (known: {', '.join(METHODS)})"
        )
    return METHODS[name]


def _global_param(method: MethodDescription, key: str, value: Any, where: str) -> Param:
    """A top-level parameter, checked against the method's description."""
    spec = method.param(key)
    if spec is None:
        known = ", ".join(method.param_names) or "none"
        raise RecyclerError(f"{where}: unknown parameter for {method.name} (known: {known})")
    return parse(value, where, spec.kind)


def _check_values(spec: ParamSpec, value: Param | None, where: str) -> None:
    for v in values_of(value):
        if isinstance(v, bool) or not spec.bounds.contains(v):
            raise RecyclerError(f"{where}: must be in {spec.bounds}, got {v:g}")


def _model_spec(entry: Any, where: str, method: MethodDescription) -> ModelSpec:
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
    per_model = [p.name for p in method.params if p.scope == "model"]
    for key in params:
        if key not in per_model:
            raise RecyclerError(
                f"{where}.parameters.{key}: unknown parameter for {method.name} "
                f"(known: {', '.join(per_model) or 'none'})"
            )
    values = {
        key: parse(value, f"{where}.parameters.{key}", _kind(method, key))
        for key, value in params.items()
    }
    return ModelSpec(
        model=_model_path(entry["model"], f"{where}.model"),
        weight=values.pop("weight", None),
        density=values.pop("density", None),
        params=values,
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


def _kind(method: MethodDescription, key: str) -> str:
    spec = method.param(key)
    return spec.kind if spec is not None else "float"
