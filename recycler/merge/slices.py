"""`slices:` recipes: layer ranges of models merged and stacked into a model of a new depth.

    slices:
      - sources:
          - {model: a, layer_range: [0, 24]}
      - sources:
          - {model: b, layer_range: [20, 40]}
    merge_method: passthrough
    dtype: bfloat16

As mergekit 0.1.5 reads them: each slice merges the same number of layers from each of
its sources (per-source `parameters`, then the slice's, then the recipe's, each tried
where the one before it is unset; layer gradients spread over the slice's layers), and
the slices' layers are stacked in order. The tensors outside the layers are merged by the
first slice (those before the layers: embeddings) or the last one (final norm, head),
from that slice's sources, at t = 0. A slice's `base_model` (else the recipe's) must be
one of its sources where the method reads a base: its layers in the slice are the base's.

Each slice becomes an ordinary `Recipe` over `LayerView`s of its sources (the engine
merges it unchanged); `stacked_config` writes the new depth into the config, with every
per-layer list the architecture has (Qwen2's `layer_types`) taken layer by layer from
the sources.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from recycler.errors import RecyclerError
from recycler.merge import conditional
from recycler.merge.layer_view import LAYER_COUNT_KEYS, LayerView
from recycler.merge.methods import METHODS
from recycler.merge.recipe import SHARED_TOP_KEYS, Recipe
from recycler.merge.tokenizer_choice import TokenizerChoice, read_tokenizer_keys
from recycler.pool import Checkpoint, Pool
from recycler.pool.detect import open_checkpoint

_TOP_KEYS = SHARED_TOP_KEYS | {"slices"}
# Tensors outside the layers that come before them (merged by the first slice).
_BEFORE_LAYERS = ("embed", "wte", "wpe")


@dataclass(frozen=True)
class SliceSource:
    model: str
    layer_range: tuple[int, int]


@dataclass(frozen=True)
class OutputSlice:
    """One slice: its sources and the flat recipe that merges them (models in source order,
    the base, if any, among them)."""

    sources: list[SliceSource]
    recipe: Recipe
    base_source: SliceSource | None

    @property
    def n_layers(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


@dataclass(frozen=True)
class SlicedRecipe:
    slices: list[OutputSlice]
    data: dict[str, Any]  # the recipe as read, for recipe.yaml
    tokenizer: TokenizerChoice

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> SlicedRecipe:
        if "models" in data:
            raise RecyclerError(f"{where}: models: give either models or slices, not both")
        for key in data:
            if key not in _TOP_KEYS:
                raise RecyclerError(
                    f"{where}: {key}: unknown key (known: {', '.join(sorted(_TOP_KEYS))})"
                )
        raw = data.get("slices")
        if not isinstance(raw, list) or not raw:
            raise RecyclerError(f"{where}: slices: must be a non-empty list")
        method_name = data.get("merge_method")
        if not isinstance(method_name, str) or method_name not in METHODS:
            raise RecyclerError(
                f"{where}: merge_method: unknown method {method_name!r} "
                f"(known: {', '.join(METHODS)})"
            )
        top = data.get("parameters") or {}
        if not isinstance(top, dict):
            raise RecyclerError(f"{where}: parameters: must be a mapping")
        slices, first_layer = [], 0
        for k, entry in enumerate(raw):
            out = _slice(entry, data, top, f"{where}: slices.{k}", first_layer)
            slices.append(out)
            first_layer += out.n_layers
        return cls(slices, data, read_tokenizer_keys(data, where))

    @property
    def n_layers(self) -> int:
        return sum(s.n_layers for s in self.slices)

    def to_yaml(self, locate: dict[str, Path]) -> str:
        """The recipe with every model as the absolute path it was read from."""

        def resolved(value: Any) -> Any:
            if isinstance(value, str) and value in locate:
                return str(locate[value].resolve())
            return value

        data = dict(self.data)
        data["slices"] = [
            {
                **entry,
                **({"base_model": resolved(entry["base_model"])} if "base_model" in entry else {}),
                "sources": [{**src, "model": resolved(src["model"])} for src in entry["sources"]],
            }
            for entry in data["slices"]
        ]
        if "base_model" in data:
            data["base_model"] = resolved(data["base_model"])
        return yaml.safe_dump(data, sort_keys=False)


def _slice(
    entry: Any, data: dict[str, Any], top: dict[str, Any], where: str, first_layer: int
) -> OutputSlice:
    if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list):
        raise RecyclerError(f"{where}.sources: must be a non-empty list")
    for key in entry:
        if key not in {"sources", "base_model", "parameters"}:
            raise RecyclerError(
                f"{where}.{key}: unknown key (known: base_model, parameters, sources)"
            )
    if not entry["sources"]:
        raise RecyclerError(f"{where}.sources: must be a non-empty list")
    sources = [_source(s, f"{where}.sources.{j}") for j, s in enumerate(entry["sources"])]
    n = sources[0].layer_range[1] - sources[0].layer_range[0]
    for j, s in enumerate(sources):
        if s.layer_range[1] - s.layer_range[0] != n:
            raise RecyclerError(
                f"{where}.sources.{j}.layer_range: {s.layer_range[1] - s.layer_range[0]} layers, "
                f"but sources.0 has {n} (a slice merges the same number from each source)"
            )
    method = METHODS[str(data["merge_method"])]
    own = entry.get("parameters") or {}
    if not isinstance(own, dict):
        raise RecyclerError(f"{where}.parameters: must be a mapping")
    parameters = {}
    for key in {**top, **own}:
        spec = method.param(key)
        kind = spec.kind if spec is not None else "float"
        chained = conditional.chain(
            *(
                conditional.parse(v, f"{where}.parameters.{key}", kind) if v is not None else None
                for v in (own.get(key), top.get(key))
            )
        )
        if chained is not None:
            parameters[key] = conditional.setting_to_yaml(chained)
    base = entry.get("base_model", data.get("base_model"))
    base_source = next((s for s in sources if s.model == base), None)
    if base is not None and method.uses_base and base_source is None:
        raise RecyclerError(
            f"{where}.sources: the base model {base} is not among them (its layers in the "
            "slice are the base's)"
        )
    flat: dict[str, Any] = {
        "merge_method": method.name,
        "models": [
            {"model": s.model, **({"parameters": p} if (p := raw.get("parameters")) else {})}
            for s, raw in zip(sources, entry["sources"])
        ],
        "parameters": parameters,
        **{k: data[k] for k in ("dtype", "out_dtype", "random_seed") if k in data},
    }
    if base is not None:
        flat["base_model"] = base
    recipe = Recipe.from_dict(flat, where=where)
    return OutputSlice(sources, dataclasses.replace(recipe, first_layer=first_layer), base_source)


def _source(entry: Any, where: str) -> SliceSource:
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        raise RecyclerError(f"{where}.model: must be a path")
    for key in entry:
        if key not in {"model", "layer_range", "parameters"}:
            raise RecyclerError(
                f"{where}.{key}: unknown key (known: layer_range, model, parameters)"
            )
    lr = entry.get("layer_range")
    if (
        not isinstance(lr, list)
        or len(lr) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in lr)
        or not 0 <= lr[0] < lr[1]
    ):
        raise RecyclerError(
            f"{where}.layer_range: must be [FIRST, END] with 0 <= FIRST < END, got {lr!r}"
        )
    return SliceSource(entry["model"], (lr[0], lr[1]))


def open_slices(
    recipe: SlicedRecipe, locate: dict[str, Path], *, allow_pickle: bool = False
) -> list[Pool]:
    """One pool of layer views per slice, its tensor names the output's."""
    opened: dict[str, Checkpoint] = {}

    def checkpoint(model: str) -> Checkpoint:
        if model not in opened:
            opened[model] = open_checkpoint(locate[model], base=None, allow_pickle=allow_pickle)
        return opened[model]

    pools, first_layer, last = [], 0, len(recipe.slices) - 1
    for k, out in enumerate(recipe.slices):
        views: list[Checkpoint] = []
        for j, src in enumerate(out.sources):
            inner = checkpoint(src.model)
            depth = _depth(inner)
            if depth is not None and src.layer_range[1] > depth:
                raise RecyclerError(
                    f"slices.{k}.sources.{j}.layer_range: {list(src.layer_range)} is beyond the "
                    f"{depth} layers of {locate[src.model]}"
                )
            outside = frozenset(
                n
                for n in inner.stored_names()
                if conditional.layer_index(n) is None
                and ((k == 0 and _before_layers(n)) or (k == last and not _before_layers(n)))
            )
            views.append(LayerView(inner, src.layer_range, first_layer, outside))
        base = None
        if out.base_source is not None and out.recipe.method.uses_base:
            index = out.sources.index(out.base_source)
            base = views.pop(index)
        pools.append(Pool(views, base))
        first_layer += out.n_layers
    return pools


def _before_layers(name: str) -> bool:
    return any(part in name for part in _BEFORE_LAYERS)


def _depth(ckpt: Checkpoint) -> int | None:
    config = ckpt.config() or {}
    return next((int(config[k]) for k in LAYER_COUNT_KEYS if k in config), None)


def stacked_config(recipe: SlicedRecipe, pools: list[Pool]) -> dict[str, Any]:
    """The first slice's reference config with the new depth; every list with one entry per
    layer (Qwen2's `layer_types`, ...) rebuilt from each slice's reference source."""
    first = pools[0].reference
    config = dict(_inner_config(first))
    depth = _depth_of(config)
    for key in LAYER_COUNT_KEYS:
        if key in config:
            config[key] = recipe.n_layers
    for key, value in list(config.items()):
        if isinstance(value, list) and depth is not None and len(value) == depth:
            per_layer = []
            for pool in pools:
                ref = pool.reference
                theirs = _inner_config(ref).get(key)
                if not isinstance(theirs, list) or not isinstance(ref, LayerView):
                    raise RecyclerError(f"{ref.path}: config.json: {key}: not a per-layer list")
                per_layer += theirs[ref.layer_range[0] : ref.layer_range[1]]
            config[key] = per_layer
    return config


def _inner_config(view: Checkpoint) -> dict[str, Any]:
    config = view.inner.config() if isinstance(view, LayerView) else view.config()
    if config is None:
        raise RecyclerError(f"{view.path}: no config.json (a slices recipe needs one)")
    return config


def _depth_of(config: dict[str, Any]) -> int | None:
    return next((int(config[k]) for k in LAYER_COUNT_KEYS if k in config), None)
