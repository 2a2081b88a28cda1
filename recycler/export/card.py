"""The model card (README.md) of a merged model: what was merged, how, from which exact
bytes, and, for a model chosen by a search, how it scored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recycler import __version__
from recycler.merge.recipe import Recipe
from recycler.pool import Pool

# The Hub's metadata block that opens every card, and how a card's recipe is run again.
_FRONT_MATTER = ["---", "library_name: transformers", "tags: [merge, recycler]", "---", ""]
_REPRODUCE = "(`recycler merge recipe.yaml OUT` or mergekit's `mergekit-yaml recipe.yaml OUT`)."


def model_card(
    pool: Pool, recipe: Recipe, hashes: dict[Path, str], extra: dict[str, Any] | None
) -> str:
    """README.md: what was merged, how, from which exact bytes, and (from a search) how it
    scored."""
    data = recipe.to_dict()
    lines = [
        *_FRONT_MATTER,
        f"# Merged model ({recipe.merge_method})",
        "",
        f"Made by recycler {__version__} with `{recipe.merge_method}`; `recipe.yaml` beside this "
        "file reproduces it " + _REPRODUCE,
        "",
        "## Recipe",
        "",
    ]
    # One column per per-model parameter the method reads (slerp's checkpoints have none).
    columns = [p for p in recipe.method.params if p.scope == "model"]
    top = data.get("parameters", {})
    lines += [
        "| checkpoint |" + "".join(f" {p.name} |" for p in columns),
        "|---|" + "---|" * len(columns),
    ]
    for entry, ckpt in zip(data["models"], pool.checkpoints):
        params = entry.get("parameters", {})
        cells = [_fmt(params.get(p.name, top.get(p.name, p.default))) for p in columns]
        lines.append(f"| {ckpt.name} |" + "".join(f" {c} |" for c in cells))
    lines += ["", f"- method: `{recipe.merge_method}`", f"- dtype: `{recipe.dtype}`"]
    if recipe.base_model:
        lines.append(f"- base model: `{recipe.base_model}`")
    for key, value in top.items():
        if all(p.name != key for p in columns):
            lines.append(f"- {key}: `{_fmt(value)}`")
    if extra:
        lines += ["", "## Search", ""]
        for key, value in extra.items():
            if isinstance(value, dict):
                lines += [f"**{key}**", "", "| name | value |", "|---|---|"]
                lines += [f"| {k} | {_fmt(v)} |" for k, v in value.items()]
                lines.append("")
            else:
                lines.append(f"- {key}: {_fmt(value)}")
    lines += ["", "## Inputs", "", "| input | file | sha256 |", "|---|---|---|"]
    for ckpt in [c for c in [pool.base, *pool.checkpoints] if c is not None]:
        role = "base" if ckpt is pool.base else ckpt.name
        for f in ckpt.files():
            lines.append(f"| {role} | `{f.resolve()}` | `{hashes.get(f, '?')}` |")
    return "\n".join(lines) + "\n"


def stacked_card(recipe_yaml: str, hashes: dict[Path, str]) -> str:
    """README.md of a `slices:` merge: its recipe and the exact input files."""
    lines = [
        *_FRONT_MATTER,
        "# Merged model (layer slices)",
        "",
        f"Made by recycler {__version__}; `recipe.yaml` beside this file reproduces it "
        + _REPRODUCE,
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
        "## Inputs",
        "",
        "| file | sha256 |",
        "|---|---|",
    ]
    lines += [f"| `{f.resolve()}` | `{h}` |" for f, h in sorted(hashes.items())]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        if all(isinstance(e, dict) for e in value):
            return "per-tensor: " + ", ".join(
                f"{e.get('filter', '*')}={_point(e['value'])}" for e in value
            )
        return "layer gradient " + _point(value)
    if isinstance(value, dict):  # a tuned value per group of tensors
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _point(value: Any) -> str:
    """A number, a switch or a layer gradient, short."""
    if isinstance(value, list):
        return "[" + " → ".join(_point(v) for v in value) + "]"
    return f"{value:.3g}" if isinstance(value, float) else str(value)
