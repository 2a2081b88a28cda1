"""Assemble a merge as an ordinary Hugging Face model directory, atomically and streamed.

The directory is built beside OUT_DIR under a hidden name and renamed into place at
the end, so a failure or a kill never leaves a half-written OUT_DIR. The shards are
planned and written by `pool.safetensors_writer`; their tensors come from the merge
engine:

- on the CPU, tensors whose merge is one linear combination of stored tensors go
  file to file through the C kernel (`engine.FileMerger`);
- the rest are merged one at a time (`engine.iter_merged`) and written by a second
  thread while the next is merged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recycler.errors import RecyclerError
from recycler.export.card import model_card
from recycler.merge.engine import FileJob, FileMerger, MergeStats, iter_merged
from recycler.merge.recipe import Recipe
from recycler.pool import Pool, TensorInfo
from recycler.pool.checkpoint import load_json
from recycler.pool.hashing import sha256_files_async
from recycler.pool.safetensors_file import dtype_name
from recycler.pool.safetensors_writer import (
    ShardFiles,
    WriterThread,
    plan_output_files,
    write_index,
)

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_TMP_TAG = ".recycler-tmp-"


class OutputExists(RecyclerError):
    """OUT_DIR holds files and `force` was not given."""


@dataclass(frozen=True)
class MergePart:
    """Tensors of the output that one pool and recipe merge (a `slices:` recipe has one per
    slice; the pool's tensor names are the output's)."""

    pool: Pool
    recipe: Recipe


@dataclass(frozen=True)
class OutputFacts:
    """What the output dir says besides its tensors."""

    config: dict[str, Any]
    tokenizer_dir: Path
    recipe_yaml: str
    card: Callable[[dict[Path, str]], str]  # the input files' sha256 -> README.md
    chat_template: str | None = None  # Jinja text replacing the tokenizer's own


def write_model_dir(
    out_dir: Path,
    pool: Pool,
    recipe: Recipe,
    *,
    device: str = "cpu",
    force: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    card_extra: dict[str, Any] | None = None,
    stats: MergeStats | None = None,
) -> Path:
    """Merge `pool` by `recipe` from disk and write a HF model dir at `out_dir`."""
    resolved = _resolved_recipe(pool, recipe)
    facts = OutputFacts(
        config=load_json(pool.config_dir / "config.json"),
        tokenizer_dir=_tokenizer_dir(pool, recipe),
        recipe_yaml=resolved.to_yaml(),
        card=lambda hashes: model_card(pool, resolved, hashes, card_extra),
        chat_template=recipe.chat_template,
    )
    return write_parts(
        out_dir,
        [MergePart(pool, recipe)],
        facts,
        device=device,
        force=force,
        max_shard_bytes=max_shard_bytes,
        stats=stats,
    )


def write_parts(
    out_dir: Path,
    parts: Sequence[MergePart],
    facts: OutputFacts,
    *,
    device: str = "cpu",
    force: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    stats: MergeStats | None = None,
) -> Path:
    """Merge every part from disk into one HF model dir at `out_dir` (built beside it, renamed
    into place)."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}{_TMP_TAG}{os.getpid()}"
    stats = stats if stats is not None else MergeStats()
    out_code = parts[0].recipe.out_code
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        inputs = {
            f: None
            for part in parts
            for c in [part.pool.base, *part.pool.checkpoints]
            if c is not None
            for f in c.files()
        }
        hashes = sha256_files_async(iter(inputs))
        infos = {
            n: _out_info(part.pool.info(n), out_code)
            for part in parts
            for n in part.pool.tensor_names
        }
        shards = plan_output_files(infos, max_shard_bytes)
        started = time.perf_counter()
        files = ShardFiles(tmp, shards)
        try:
            for part in parts:
                _write_part(part, files, device, stats)
            files.check_complete()
        finally:
            files.close()
        stats.seconds = time.perf_counter() - started
        write_index(tmp, shards)
        _write_config(tmp, facts.config, out_code)
        _copy_tokenizer(tmp, facts.tokenizer_dir)
        if facts.chat_template is not None:
            _write_chat_template(tmp, facts.chat_template)
        (tmp / "recipe.yaml").write_text(facts.recipe_yaml)
        (tmp / "README.md").write_text(facts.card(hashes.result()))
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_part(part: MergePart, files: ShardFiles, device: str, stats: MergeStats) -> None:
    pool, recipe = part.pool, part.recipe
    rest = _merge_file_to_file(pool, recipe, files, stats) if device == "cpu" else pool.tensor_names
    writer = WriterThread(files)
    try:
        for name, tensor in _on_device(iter_merged(pool, recipe, device, stats, names=rest)):
            writer.put(name, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _merge_file_to_file(
    pool: Pool, recipe: Recipe, files: ShardFiles, stats: MergeStats
) -> list[str]:
    """Merge every tensor that `FileMerger` can straight into its slot; the names left."""
    merger = FileMerger(pool, recipe)
    jobs, rest = [], []
    for name in pool.tensor_names:
        terms = merger.plan(name)
        if terms is None:
            rest.append(name)
        else:
            jobs.append(FileJob(name, terms, *files.slot(name)))
    try:
        merger.merge(jobs, stats)
    finally:
        merger.close()
    return rest


def _on_device(items: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    # Tensors merged on a GPU are copied back here, one at a time, before writing.
    for name, tensor in items:
        yield name, tensor.cpu() if tensor.device.type != "cpu" else tensor


def _out_info(info: TensorInfo, out_code: str) -> TensorInfo:
    return TensorInfo(info.shape, out_code if info.is_floating_point else info.code)


def check_out_dir(out_dir: Path, force: bool) -> None:
    """A command's output folder may be written: absent, empty, or `force` given."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise RecyclerError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not force:
            raise OutputExists(f"{out_dir}: exists and is not empty")


def _remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Leftovers of a killed run (its pid no longer alive) are removed."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}{_TMP_TAG}*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """`tmp` (written beside `out_dir`) becomes `out_dir`, replacing what was there."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.recycler-old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _write_config(tmp: Path, config: dict[str, Any], code: str) -> None:
    config = dict(config)
    name = dtype_name(code)
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _tokenizer_dir(pool: Pool, recipe: Recipe) -> Path:
    return tokenizer_dir(recipe.tokenizer_source, pool.config_dir)


def tokenizer_dir(source: str | None, base_dir: Path) -> Path:
    """Where the output's tokenizer comes from: `base` (the default) or a model dir."""
    if source in (None, "base"):
        return base_dir
    path = Path(source)
    if not path.is_dir():
        raise RecyclerError(  # union and the rest are refused as the recipe is read
            f"tokenizer_source: {source!r} is not a directory (use base or a model dir)"
        )
    return path


def _write_chat_template(tmp: Path, template: str) -> None:
    """The recipe's template, where transformers reads it first (chat_template.jinja) and in
    tokenizer_config.json, which older versions read."""
    (tmp / "chat_template.jinja").write_text(template)
    (tmp / "chat_template.json").unlink(missing_ok=True)
    config_path = tmp / "tokenizer_config.json"
    if config_path.is_file():
        config = load_json(config_path)
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def _copy_tokenizer(tmp: Path, source: Path) -> None:
    for filename in TOKENIZER_FILES:
        if (source / filename).is_file():
            shutil.copy2(source / filename, tmp / filename)


def _resolved_recipe(pool: Pool, recipe: Recipe) -> Recipe:
    """The recipe with every model as an absolute path, so it reproduces from anywhere."""
    models = [
        dataclasses.replace(spec, model=str(c.path.resolve()))
        for spec, c in zip(recipe.models, pool.checkpoints)
    ]
    base = (
        str(pool.base.path.resolve())
        if pool.base is not None and recipe.base_model is not None
        else recipe.base_model
    )
    return Recipe(
        merge_method=recipe.merge_method,
        models=models,
        base_model=base,
        parameters=dict(recipe.parameters),
        dtype=recipe.dtype,
        out_dtype=recipe.out_dtype,
        tokenizer_source=recipe.tokenizer_source,
        chat_template=recipe.chat_template,
        random_seed=recipe.random_seed,
    )
