"""A recipe's parameter settings as mergekit 0.1.5 reads them: parsed, resolved per tensor,
written back.

A setting is

- a number (or true/false for a switch such as `normalize`);
- a layer gradient: a list of numbers spread evenly over the layers being merged and
  linearly interpolated between them (`[0, 0.5, 1]`: 0 at the first layer, 0.5 in the
  middle, 1 at the last); a list of true/false picks the entry at or below the layer's
  position;
- a list of conditional entries `{filter: NAME, value: SETTING}` (or one such mapping),
  the value a number or a gradient: the first entry whose filter is a substring of the
  tensor name wins; no filter, or `"*"`, matches every tensor. Where none matches, the
  setting is unset for that tensor and the next, lower-precedence setting applies.

A layer's position is t = i / (n − 1) for layer i of the n layers being merged (of a
`slices:` entry: i counts from the slice's first layer; a one-layer slice has t = 1);
tensors outside the layer stack (embeddings, final norm, head) have t = 0 and take a
gradient's first value. These are mergekit's rules (`evaluate_setting` and the planner's
t), reproduced here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

from recycler.errors import RecyclerError

Scalar = float | bool
Gradient = tuple[Scalar, ...]
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class FilterValue:
    """One conditional entry; `filter=None` matches every tensor."""

    filter: str | None
    value: Scalar | Gradient


Param = Scalar | Gradient | tuple[FilterValue, ...]


def layer_index(tensor_name: str) -> int | None:
    """The layer a tensor belongs to (`model.layers.3.mlp...` → 3); None outside the layers."""
    match = _LAYER_INDEX.search(tensor_name)
    return int(match.group(1)) if match is not None else None


def with_layer_index(tensor_name: str, index: int) -> str:
    """The tensor's name in layer `index` (`model.layers.3.mlp...` → `model.layers.7.mlp...`)."""
    match = _LAYER_INDEX.search(tensor_name)
    assert match is not None, tensor_name
    return tensor_name[: match.start(1)] + str(index) + tensor_name[match.end(1) :]


def layer_position(tensor_name: str, n_layers: int, first_layer: int = 0) -> float:
    """mergekit's t for a tensor: (i − first_layer) / (n_layers − 1) inside the layers
    (1 for a single layer), 0 outside them."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    if n_layers <= 1:
        return 1.0
    return (index - first_layer) / (n_layers - 1)


def resolve(
    value: Param | None, tensor_name: str, n_layers: int, first_layer: int = 0
) -> Scalar | None:
    """A setting's value for one tensor; None where it is unset or no filter matches."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if value and isinstance(value[0], FilterValue):
        for entry in value:
            assert isinstance(entry, FilterValue)
            if entry.filter in (None, "*") or (tensor_name and entry.filter in tensor_name):
                return resolve(entry.value, tensor_name, n_layers, first_layer)
        return None
    points = [v for v in value if not isinstance(v, FilterValue)]
    return interpolate(points, layer_position(tensor_name, n_layers, first_layer))


def interpolate(points: list[Scalar], t: float) -> Scalar:
    """A gradient's value at position t in [0, 1], computed as mergekit computes it."""
    if any(isinstance(p, bool) for p in points):
        return points[int(t * (len(points) - 1))]
    scaled = t * (len(points) - 1)
    i0 = int(scaled)
    i1 = min(len(points) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(points[i0]) + frac * float(points[i1])


def values_of(value: Param | None) -> list[Scalar]:
    """Every number a setting names (each filter's, each gradient point), for range checks."""
    if value is None:
        return []
    if isinstance(value, (bool, int, float)):
        return [value]
    out: list[Scalar] = []
    for entry in value:
        out.extend(values_of(entry.value) if isinstance(entry, FilterValue) else [entry])
    return out


def filters_of(value: Param | None) -> list[str]:
    """The filters a setting names."""
    if not isinstance(value, tuple):
        return []
    return [e.filter for e in value if isinstance(e, FilterValue) and e.filter]


def parse(value: Any, where: str, kind: str = "float") -> Param:
    """A setting from YAML, for a parameter of `kind` (float, int or bool); the error names
    `where`."""
    if isinstance(value, dict):
        value = [value]  # one conditional entry, as mergekit accepts it
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        entries = []
        for j, entry in enumerate(value):
            if set(entry) - {"filter", "value"} or "value" not in entry:
                raise RecyclerError(
                    f"{where}[{j}]: expected {{filter: NAME, value: {_expected(kind)}}}, "
                    f"got {entry!r}"
                )
            filt = entry.get("filter")
            if filt is not None and not isinstance(filt, str):
                raise RecyclerError(f"{where}[{j}].filter: must be text, got {filt!r}")
            entries.append(FilterValue(filt, _plain(entry["value"], f"{where}[{j}].value", kind)))
        return tuple(entries)
    return _plain(value, where, kind)


def _plain(value: Any, where: str, kind: str) -> Scalar | Gradient:
    """A number, a switch or a gradient of them."""
    if _fits(value, kind):
        return value if kind == "bool" else float(value)
    if isinstance(value, list) and value:
        if all(_fits(v, kind) for v in value):
            return tuple(v if kind == "bool" else float(v) for v in value)
        bad = next(v for v in value if not _fits(v, kind))
        raise RecyclerError(
            f"{where}: a layer gradient takes {_expected(kind)} values only, got {bad!r}"
        )
    if kind == "bool":
        raise RecyclerError(f"{where}: must be true or false, got {value!r}")
    if kind == "int" and _fits(value, "float"):
        raise RecyclerError(f"{where}: must be an integer, got {value!r}")
    raise RecyclerError(f"{where}: not a number: {value!r}")


def _fits(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return kind != "int" or float(value) == int(value)


def _expected(kind: str) -> str:
    return {"bool": "true/false", "int": "INTEGER"}.get(kind, "NUMBER")


def setting_to_yaml(value: Param) -> Any:
    """A setting as mergekit's YAML writes it (filter lists stay filter lists)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    out: list[Any] = []
    for e in value:
        if isinstance(e, FilterValue):
            inner = setting_to_yaml(e.value)
            out.append(
                {"filter": e.filter, "value": inner} if e.filter is not None else {"value": inner}
            )
        else:
            out.append(e if isinstance(e, bool) else float(e))
    return out


def chain(*settings: Param | None) -> Param | None:
    """One setting that is `settings` tried in order, each where the ones before it are unset
    (a slice's own setting before the recipe's, as mergekit reads them)."""
    present = [s for s in settings if s is not None]
    if len(present) <= 1:
        return present[0] if present else None
    entries: list[FilterValue] = []
    for s in present:
        conditional = [e for e in s if isinstance(e, FilterValue)] if isinstance(s, tuple) else []
        if conditional:
            entries.extend(conditional)
            continue
        plain = cast(Scalar | Gradient, s)
        entries.append(FilterValue(None, plain))
        break  # an unconditional setting ends the chain: nothing after it is read
    return tuple(entries)
