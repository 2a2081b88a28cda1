"""Multi-stage recipes: several YAML documents in one file, later ones merging earlier ones.

    merge_method: slerp            # stage 1
    ...
    name: smooth                   # later documents may name it as a model
    out_path: stages/smooth        # where it is written (relative to the recipe's folder)
    ---
    merge_method: ties             # the last stage: written to OUT_DIR
    models: [{model: smooth, ...}, ...]

As mergekit-multimerge (its `name`s) and the recipes published with `out_path` read
them: a stage's output is its `out_path`, else a folder named `name` beside OUT_DIR; the
last stage's is OUT_DIR. A model, base model or tokenizer source that is an earlier
stage's name is that stage's output. Stages run in order; `recycler merge` leaves out a
stage whose output is already complete (its recipe.yaml is the one this run would write).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recycler.errors import RecyclerError

_MODEL_KEYS = ("model", "models", "base_model", "tokenizer_source")


@dataclass(frozen=True)
class Stage:
    label: str  # "stage 2/3 NAME"
    data: dict[str, Any]  # the recipe document, earlier stages' names replaced by their outputs
    out_dir: Path


def plan_stages(documents: list[Any], recipe_path: Path, out_dir: Path) -> list[Stage]:
    """The stages of a multi-document recipe, in order; one line naming the document and key
    for a bad one."""
    stages: list[Stage] = []
    outputs: dict[str, Path] = {}
    documents = [d for d in documents if d is not None]
    for i, doc in enumerate(documents):
        where = f"{recipe_path}: document {i + 1}"
        if not isinstance(doc, dict):
            raise RecyclerError(f"{where}: expected a mapping with merge_method")
        data = dict(doc)
        name, out_path = data.pop("name", None), data.pop("out_path", None)
        if name is not None and (not isinstance(name, str) or name in outputs):
            raise RecyclerError(f"{where}: name: must be a new stage name, got {name!r}")
        if out_path is not None and not isinstance(out_path, str):
            raise RecyclerError(f"{where}: out_path: must be a path, got {out_path!r}")
        last = i == len(documents) - 1
        target = recipe_path.parent / out_path if out_path is not None else None
        if last:
            if target is not None and target.resolve() != out_dir.resolve():
                raise RecyclerError(
                    f"{where}: out_path: {out_path} is not OUT_DIR {out_dir} "
                    "(the last stage is written to OUT_DIR)"
                )
            target = out_dir
        elif target is None:
            if name is None:
                raise RecyclerError(
                    f"{where}: out_path: needed (or a name) for a stage before the last"
                )
            target = out_dir.parent / name
        stages.append(
            Stage(
                f"stage {i + 1}/{len(documents)}{f' {name}' if name else ''}",
                _named_outputs(data, outputs),
                target,
            )
        )
        if name is not None:
            outputs[name] = target
    return stages


def _named_outputs(value: Any, outputs: dict[str, Path], key: str = "") -> Any:
    """`value` with every model reference that names an earlier stage replaced by its output."""
    if isinstance(value, dict):
        return {k: _named_outputs(v, outputs, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_named_outputs(v, outputs, key) for v in value]
    if key in _MODEL_KEYS and isinstance(value, str) and value in outputs:
        return str(outputs[value])
    return value
