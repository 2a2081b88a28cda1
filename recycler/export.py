"""Write a merge as an ordinary Hugging Face model directory, atomically and streamed.

The directory is built beside OUT_DIR under a hidden name and renamed into place at
the end, so a failure or a kill never leaves a half-written OUT_DIR. Shard headers
are known up front (every shape and dtype is in the pool's index), so each shard
file is created at its full size and every tensor is written at its own offset:

- on the CPU, tensors whose merge is one linear combination of stored tensors go
  file to file through the C kernel (`engine.FileMerger`);
- the rest are merged one at a time (`engine.iter_merged`) and written by a second
  thread while the next is merged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recycler import __version__
from recycler.errors import RecyclerError
from recycler.merge.engine import FileJob, FileMerger, MergeStats, iter_merged
from recycler.merge.recipe import Recipe
from recycler.pool import Pool, TensorInfo
from recycler.pool.hashing import sha256_files_async
from recycler.pool.safetensors_file import dtype_name

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


@dataclass(frozen=True)
class _Shard:
    filename: str
    names: list[str]
    header: bytes
    nbytes: int
    tensor_nbytes: list[int]


def plan_shards(infos: dict[str, TensorInfo], max_shard_bytes: int) -> list[_Shard]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, info in infos.items():
        if groups[-1] and size + info.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += info.nbytes
    shards = []
    for i, names in enumerate(groups):
        filename = (
            "model.safetensors"
            if len(groups) == 1
            else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            info = infos[name]
            header[name] = {
                "dtype": info.code,
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keeps tensor data 8-byte aligned
        shards.append(
            _Shard(
                filename,
                names,
                len(raw).to_bytes(8, "little") + raw,
                offset,
                [infos[n].nbytes for n in names],
            )
        )
    return shards


class _ShardFiles:
    """The output shards, created at their full size with their headers; each tensor
    is written at its planned offset, in any order."""

    def __init__(self, directory: Path, shards: list[_Shard]) -> None:
        self._slots: dict[str, tuple[int, int, int, Path]] = {}  # name -> fd, offset, bytes, path
        self._fds: list[int] = []
        self._unwritten: set[str] = set()
        try:
            for shard in shards:
                path = directory / shard.filename
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    self._fds.append(fd)
                    os.ftruncate(fd, len(shard.header) + shard.nbytes)
                except OSError as exc:
                    raise RecyclerError(f"{path}: cannot write: {exc.strerror or exc}") from None
                self._pwrite(fd, shard.header, 0, path)
                offset = len(shard.header)
                for name, nbytes in zip(shard.names, shard.tensor_nbytes):
                    self._slots[name] = (fd, offset, nbytes, path)
                    offset += nbytes
                self._unwritten.update(shard.names)
        except BaseException:
            self.close()
            raise

    def slot(self, name: str) -> tuple[int, int, Path]:
        """(fd, offset, path) where `name`'s bytes go; the caller writes them there."""
        fd, offset, _, path = self._slots[name]
        self._unwritten.discard(name)
        return fd, offset, path

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        flat = tensor.detach().reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        nbytes = self._slots[name][2]
        if flat.numel() * flat.element_size() != nbytes:
            raise RuntimeError(
                f"tensor {name}: {flat.numel() * flat.element_size()} bytes, planned {nbytes}"
            )
        fd, offset, path = self.slot(name)
        if nbytes:
            self._pwrite(fd, flat.contiguous().view(torch.uint8).numpy().data, offset, path)

    def check_complete(self) -> None:
        if self._unwritten:
            raise RuntimeError(
                f"{len(self._unwritten)} tensors were never written, e.g. {min(self._unwritten)}"
            )

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    @staticmethod
    def _pwrite(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise RecyclerError(f"{path}: cannot write: {exc.strerror or exc}") from None


class _WriterThread:
    """Writes merged tensors to their slots on a thread of its own."""

    def __init__(self, files: _ShardFiles) -> None:
        self._files = files
        self._queue: queue.Queue[tuple[str, torch.Tensor] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="recycler-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put((name, tensor), timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        # Drain so the thread is not left blocked, then stop it.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                self._files.write(*item)
        except BaseException as exc:
            self._error = exc


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
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}{_TMP_TAG}{os.getpid()}"
    stats = stats if stats is not None else MergeStats()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        inputs = [c for c in [pool.base, *pool.checkpoints] if c is not None]
        hashes = sha256_files_async(f for c in inputs for f in c.files())
        out_code = recipe.out_code
        infos = {n: _out_info(pool.info(n), out_code) for n in pool.tensor_names}
        shards = plan_shards(infos, max_shard_bytes)
        started = time.perf_counter()
        files = _ShardFiles(tmp, shards)
        try:
            rest = (
                _merge_file_to_file(pool, recipe, files, stats)
                if device == "cpu"
                else pool.tensor_names
            )
            writer = _WriterThread(files)
            try:
                for name, tensor in _on_device(
                    iter_merged(pool, recipe, device, stats, names=rest)
                ):
                    writer.put(name, tensor)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            files.check_complete()
        finally:
            files.close()
        stats.seconds = time.perf_counter() - started
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in shards)},
                "weight_map": {n: s.filename for s in shards for n in s.names},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _write_config(tmp, pool.config_dir, out_code)
        _copy_tokenizer(tmp, _tokenizer_dir(pool, recipe))
        resolved = _resolved_recipe(pool, recipe)
        (tmp / "recipe.yaml").write_text(resolved.to_yaml())
        file_hashes = hashes.result()
        (tmp / "README.md").write_text(model_card(pool, resolved, file_hashes, card_extra))
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _merge_file_to_file(
    pool: Pool, recipe: Recipe, files: _ShardFiles, stats: MergeStats
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


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise RecyclerError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not force:
            raise RecyclerError(f"{out_dir}: exists and is not empty (use --force to replace it)")


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


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.recycler-old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _write_config(tmp: Path, config_dir: Path, code: str) -> None:
    config = json.loads((config_dir / "config.json").read_text())
    name = dtype_name(code)
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _tokenizer_dir(pool: Pool, recipe: Recipe) -> Path:
    source = recipe.tokenizer_source
    if source in (None, "base"):
        return pool.config_dir
    path = Path(source)
    if not path.is_dir():
        raise RecyclerError(
            f"tokenizer_source: {source!r} is not a directory (use base or a model dir)"
        )
    return path


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
        random_seed=recipe.random_seed,
    )


def model_card(
    pool: Pool, recipe: Recipe, hashes: dict[Path, str], extra: dict[str, Any] | None
) -> str:
    """README.md: what was merged, how, from which exact bytes, and (from a search) how it scored."""
    data = recipe.to_dict()
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, recycler]",
        "---",
        "",
        f"# Merged model ({recipe.merge_method})",
        "",
        f"Made by recycler {__version__} with `{recipe.merge_method}`; `recipe.yaml` beside this file reproduces it "
        "(`recycler merge recipe.yaml OUT` or mergekit's `mergekit-yaml recipe.yaml OUT`).",
        "",
        "## Recipe",
        "",
        "| checkpoint | weight | density |",
        "|---|---|---|",
    ]
    for entry, ckpt in zip(data["models"], pool.checkpoints):
        params = entry.get("parameters", {})
        lines.append(
            f"| {ckpt.name} | {_fmt(params.get('weight', 1.0))} | {_fmt(params.get('density', '-'))} |"
        )
    lines += ["", f"- method: `{recipe.merge_method}`", f"- dtype: `{recipe.dtype}`"]
    if recipe.base_model:
        lines.append(f"- base model: `{recipe.base_model}`")
    for key, value in data.get("parameters", {}).items():
        lines.append(f"- {key}: `{value}`")
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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "per-tensor: " + ", ".join(
            f"{e.get('filter', '*')}={e['value']:.3g}" if isinstance(e, dict) else f"{e:.3g}"
            for e in value
        )
    return str(value)
