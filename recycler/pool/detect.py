"""Which kind of checkpoint a path holds, and opening it as that kind (headers only).

A file: `.safetensors`, or a pickled `.bin`/`.pt`/`.pth` (only when allowed). A dir: a
PEFT LoRA adapter (its `adapter_config.json`), safetensors shards with an index, one
`model.safetensors` (or one other `.safetensors` file that is not an adapter's or a
Fisher's), or pickled shards.
"""

from __future__ import annotations

from pathlib import Path

from recycler.errors import RecyclerError
from recycler.pool.checkpoint import (
    SAFETENSORS_INDEX,
    Checkpoint,
    PickleCheckpoint,
    SafetensorsCheckpoint,
    load_json,
)
from recycler.pool.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraCheckpoint

PICKLE_INDEX = "pytorch_model.bin.index.json"
# Files in a model dir that hold something other than the model's own weights.
_NOT_WEIGHTS = {ADAPTER_WEIGHTS, "fisher.safetensors"}


class PickleRefused(RecyclerError):
    """A pickled checkpoint, and the caller did not allow pickles."""


def open_checkpoint(path: Path, *, base: Checkpoint | None, allow_pickle: bool) -> Checkpoint:
    """Recognise what `path` holds and open it (headers only)."""
    if not path.exists():
        raise RecyclerError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint(path, [path])
        if path.suffix in {".bin", ".pt", ".pth"}:
            _check_pickle_allowed(path, allow_pickle)
            return PickleCheckpoint(path, [path])
        raise RecyclerError(f"{path}: not a checkpoint (expected a dir, .safetensors or .bin file)")

    if (path / ADAPTER_CONFIG).is_file():
        if base is None:
            raise RecyclerError(f"{path}: a LoRA adapter needs the pool's base model (set base)")
        return LoraCheckpoint(path, base)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_index(index)
        shards = [_shard_path(path, index, s) for s in dict.fromkeys(weight_map.values())]
        return SafetensorsCheckpoint(path, shards, weight_map)
    if (path / "model.safetensors").is_file():
        return SafetensorsCheckpoint(path, [path / "model.safetensors"])
    candidates = sorted(p for p in path.glob("*.safetensors") if p.name not in _NOT_WEIGHTS)
    if len(candidates) == 1:
        return SafetensorsCheckpoint(path, candidates)
    if len(candidates) > 1:
        raise RecyclerError(
            f"{path}: {len(candidates)} .safetensors files but no {SAFETENSORS_INDEX}"
        )
    pickle_index = path / PICKLE_INDEX
    if pickle_index.is_file() or (path / "pytorch_model.bin").is_file():
        _check_pickle_allowed(path, allow_pickle)
        if pickle_index.is_file():
            files = [
                _shard_path(path, pickle_index, s)
                for s in dict.fromkeys(_read_index(pickle_index).values())
            ]
        else:
            files = [path / "pytorch_model.bin"]
        return PickleCheckpoint(path, files)
    raise RecyclerError(
        f"{path}: no model weights found (model.safetensors, shards with an index, or a LoRA "
        "adapter)"
    )


def _check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise PickleRefused(
            f"{path}: pickled checkpoints can run code when loaded; convert to safetensors"
        )


def _read_index(index: Path) -> dict[str, str]:
    data = load_json(index)
    weight_map = data.get("weight_map")
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) for v in weight_map.values())
    ):
        raise RecyclerError(f"{index}: no weight_map of tensor → shard file")
    return weight_map


def _shard_path(directory: Path, index: Path, shard: str) -> Path:
    """A shard named by an index, which must be a file inside the checkpoint's own dir."""
    resolved = (directory / shard).resolve()
    if not resolved.is_relative_to(directory.resolve()):
        raise RecyclerError(f"{index}: shard {shard!r} points outside the checkpoint directory")
    if not resolved.is_file():
        raise RecyclerError(f"{index}: shard {shard!r} does not exist")
    return directory / shard
