"""`recycler merge RECIPE.yaml OUT_DIR`: a mergekit-style recipe file to a model dir.

`RECYCLER_TIMINGS_JSON=FILE` also writes the merge's time and bytes moved to FILE (for
the benchmark, which times the merge apart from the interpreter's start).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from recycler.commands._args import device, force_hint, size_in_bytes
from recycler.errors import RecyclerError
from recycler.export.card import stacked_card
from recycler.export.model_dir import (
    MergePart,
    OutputFacts,
    tokenizer_dir,
    write_model_dir,
    write_parts,
)
from recycler.merge.engine import MergeStats
from recycler.merge.recipe import Recipe
from recycler.merge.slices import SlicedRecipe, open_slices, stacked_config
from recycler.merge.stages import plan_stages
from recycler.pool import Pool
from recycler.pool.detect import PickleRefused
from recycler.yaml_file import load_yaml_documents


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE.yaml", type=Path)
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument(
        "--device", default="cpu", type=device, help="cpu, cuda or cuda:N (default: cpu)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled .bin checkpoints (loaded with weights_only=True)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        type=size_in_bytes,
        help="largest output shard (default: 5GB)",
    )


def run(args: argparse.Namespace) -> None:
    with force_hint():
        try:
            merge_recipe_file(
                args.recipe,
                args.out_dir,
                device=args.device,
                force=args.force,
                allow_pickle=args.allow_pickle,
                max_shard_bytes=args.max_shard_size,
            )
        except PickleRefused as exc:
            raise RecyclerError(f"{exc} or pass --allow-pickle") from None


def locate(path: str, recipe_dir: Path) -> Path:
    """A recipe's model path: relative ones from the working directory, as mergekit does, or
    else from the recipe's own directory."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    beside = recipe_dir / p
    if beside.exists():
        return beside
    raise RecyclerError(f"{path}: no such checkpoint (looked in {Path.cwd()} and {recipe_dir})")


def pool_for_recipe(recipe: Recipe, recipe_dir: Path, *, allow_pickle: bool = False) -> Pool:
    """Open the recipe's models (and base) as a pool, one checkpoint per model entry, in order."""
    paths = [locate(spec.model, recipe_dir) for spec in recipe.models]
    base = locate(recipe.base_model, recipe_dir) if recipe.base_model is not None else None
    return Pool.from_paths(paths, base, allow_pickle=allow_pickle)


def merge_recipe_file(
    recipe_path: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    force: bool = False,
    allow_pickle: bool = False,
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    documents = load_yaml_documents(recipe_path, "recipe")
    _check_device(device)
    options: dict[str, Any] = {
        "device": device,
        "force": force,
        "allow_pickle": allow_pickle,
        "max_shard_bytes": max_shard_bytes,
    }
    if len([d for d in documents if d is not None]) <= 1:
        data = next((d for d in documents if d is not None), None)
        return _merge_document(data, recipe_path, out_dir, "", **options)
    for stage in plan_stages(documents, recipe_path, out_dir):
        written = stage.out_dir / "recipe.yaml"
        if (
            not force
            and (stage.out_dir / "config.json").is_file()
            and written.is_file()
            and written.read_text() == _resolved_yaml(stage.data, recipe_path)
        ):
            print(f"{stage.label}: {stage.out_dir} is complete, not redone", file=sys.stderr)
            continue
        _merge_document(stage.data, recipe_path, stage.out_dir, f"{stage.label}: ", **options)
    return out_dir


def _resolved_yaml(data: dict[str, Any], recipe_path: Path) -> str:
    """The recipe.yaml a merge of `data` writes (every model as an absolute path)."""
    where = str(recipe_path)
    if "slices" in data:
        sliced = SlicedRecipe.from_dict(data, where)
        names = {s.model for out in sliced.slices for s in out.sources}
        return sliced.to_yaml({m: locate(m, recipe_path.parent) for m in names})
    recipe = Recipe.from_dict(data, where=where)

    def absolute(model: str) -> str:
        return str(locate(model, recipe_path.parent).resolve())

    models = [dataclasses.replace(m, model=absolute(m.model)) for m in recipe.models]
    base = absolute(recipe.base_model) if recipe.base_model is not None else None
    return dataclasses.replace(recipe, models=models, base_model=base).to_yaml()


def _merge_document(
    data: Any,
    recipe_path: Path,
    out_dir: Path,
    label: str,
    *,
    device: str,
    force: bool,
    allow_pickle: bool,
    max_shard_bytes: int,
) -> Path:
    stats = MergeStats()
    if isinstance(data, dict) and "slices" in data:
        n_inputs = write_sliced(
            SlicedRecipe.from_dict(data, str(recipe_path)),
            recipe_path.parent,
            out_dir,
            device=device,
            force=force,
            allow_pickle=allow_pickle,
            max_shard_bytes=max_shard_bytes,
            stats=stats,
        )
    else:
        recipe = Recipe.from_dict(data, where=str(recipe_path))
        pool = pool_for_recipe(recipe, recipe_path.parent, allow_pickle=allow_pickle)
        write_model_dir(
            out_dir,
            pool,
            recipe,
            device=device,
            force=force,
            max_shard_bytes=max_shard_bytes,
            stats=stats,
        )
        n_inputs = len(pool.checkpoints)
    timings = os.environ.get("RECYCLER_TIMINGS_JSON")
    if timings:
        Path(timings).write_text(
            json.dumps(
                {
                    "merge_seconds": stats.seconds,
                    "bytes_read": stats.bytes_read,
                    "bytes_written": stats.bytes_written,
                    "tensors": stats.tensors,
                }
            )
        )
    gb = (stats.bytes_read + stats.bytes_written) / 1e9
    print(
        f"{label}merged {n_inputs} checkpoints into {out_dir} in {stats.seconds:.2f} s "
        f"({gb / max(stats.seconds, 1e-9):.2f} GB/s)",
        file=sys.stderr,
    )
    return out_dir


def write_sliced(
    recipe: SlicedRecipe,
    recipe_dir: Path,
    out_dir: Path,
    *,
    allow_pickle: bool,
    **options: Any,
) -> int:
    """Merge a `slices:` recipe into `out_dir`; the number of distinct input models."""
    models = {s.model for out in recipe.slices for s in out.sources}
    found = {m: locate(m, recipe_dir) for m in models}
    pools = open_slices(recipe, found, allow_pickle=allow_pickle)
    source = recipe.tokenizer.source
    first = pools[0].reference
    facts = OutputFacts(
        config=stacked_config(recipe, pools),
        tokenizer_dir=tokenizer_dir(
            str(found.get(source, source)) if isinstance(source, str) else None, first.directory
        ),
        recipe_yaml=recipe.to_yaml(found),
        card=lambda hashes: stacked_card(recipe.to_yaml(found), hashes),
        chat_template=recipe.tokenizer.chat_template,
    )
    write_parts(
        out_dir, [MergePart(p, s.recipe) for p, s in zip(pools, recipe.slices)], facts, **options
    )
    return len(models)


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    import torch  # only for a merge on a GPU: a merge on the CPU runs without PyTorch

    if not torch.cuda.is_available():
        raise RecyclerError(f"--device {device}: no CUDA device is available")
