"""Checkpoints of every kind a pool may hold, behind one interface.

A checkpoint is a Hugging Face model dir (one `model.safetensors`, or shards with
`model.safetensors.index.json`), a bare `.safetensors` file, a PEFT LoRA adapter dir
(see `lora.py`), or, only when allowed, a pickled `.bin` checkpoint. Opening one
reads headers only; tensors are read lazily, one at a time. PyTorch is imported only
where a tensor is made (see safetensors_file.py).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recycler.errors import RecyclerError
from recycler.pool.safetensors_file import SafetensorsFile, TensorInfo

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
# What makes a dir a PEFT LoRA adapter (lora.py reads it).
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Files in a model dir that hold something other than the model's own weights.
_NOT_WEIGHTS = {"adapter_model.safetensors", "fisher.safetensors"}


@dataclass(frozen=True)
class TrainerState:
    """What metric-weighted averaging needs from a checkpoint's training run."""

    step: int | None
    loss: float | None


@dataclass(frozen=True)
class StoredTensor:
    """A tensor stored raw in a file: `info.nbytes` bytes from `offset`, little-endian, C order."""

    path: Path
    offset: int
    info: TensorInfo


class Checkpoint(ABC):
    """One member of a pool (or its base)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.stem if path.is_file() else path.name
        # Tensor names this checkpoint does not store but reads from another of its
        # tensors: a tied lm_head read from the input embedding.
        self.aliases: dict[str, str] = {}

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @abstractmethod
    def stored_names(self) -> list[str]:
        """Names of the tensors this checkpoint stores, in file order."""

    @abstractmethod
    def _info(self, name: str) -> TensorInfo: ...

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def files(self) -> list[Path]:
        """The files whose bytes make up this checkpoint's weights (for provenance hashes)."""

    def has(self, name: str) -> bool:
        return name in self.aliases or name in self._stored

    @cached_property
    def _stored(self) -> frozenset[str]:
        return frozenset(self.stored_names())

    def info(self, name: str) -> TensorInfo:
        return self._info(self.aliases.get(name, name))

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor in its stored dtype (a LoRA adapter's: base + delta in fp32)."""
        tensor = self._read(self.aliases.get(name, name))
        return tensor if str(device) == "cpu" else tensor.to(device, non_blocking=True)

    def locate(self, name: str) -> StoredTensor | None:
        """Where the tensor `read` returns lies as is in a file; None where it is computed
        or unpickled (a LoRA target, a `.bin` checkpoint)."""
        return None

    def prefetch(self, name: str) -> None:  # noqa: B027 - optional hook
        """Start reading a tensor ahead of its use, where the storage allows it."""

    def release(self, name: str) -> None:  # noqa: B027 - optional hook
        """Give back the memory a read tensor's pages hold."""

    def config(self) -> dict[str, Any] | None:
        path = self.directory / "config.json" if self.path.is_dir() else None
        if path is None or not path.is_file():
            return None
        return _load_json(path)

    def trainer_state(self) -> TrainerState | None:
        """Step and last training loss from the HF Trainer's `trainer_state.json`, if present."""
        path = (
            self.directory / "trainer_state.json"
            if self.path.is_dir()
            else self.path.with_suffix(".trainer_state.json")
        )
        if not path.is_file():
            return None
        state = _load_json(path)
        step = state.get("global_step")
        losses = [
            e["loss"] for e in state.get("log_history", []) if isinstance(e, dict) and "loss" in e
        ]
        return TrainerState(
            step=int(step) if isinstance(step, (int, float)) else None,
            loss=float(losses[-1]) if losses else None,
        )

    @property
    def fisher_path(self) -> Path:
        """Where `recycler fisher` stores this checkpoint's diagonal Fisher."""
        if self.path.is_dir():
            return self.path / "fisher.safetensors"
        return self.path.with_suffix(".fisher.safetensors")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class SafetensorsCheckpoint(Checkpoint):
    """A HF model dir (single file or sharded) or a bare .safetensors file."""

    def __init__(
        self, path: Path, files: list[Path], weight_map: dict[str, str] | None = None
    ) -> None:
        super().__init__(path)
        self._files = {f.name: SafetensorsFile(f) for f in files}
        self._where: dict[str, SafetensorsFile] = {}
        for sf in self._files.values():
            for tensor in sf.tensors:
                self._where.setdefault(tensor, sf)
        if weight_map is not None:
            for tensor, shard in weight_map.items():
                sf = self._files[shard]
                if tensor not in sf.tensors:
                    raise RecyclerError(
                        f"{path / SAFETENSORS_INDEX}: tensor {tensor}: index points at {shard}, which does not hold it"
                    )
                self._where[tensor] = sf

    def stored_names(self) -> list[str]:
        return list(self._where)

    def _info(self, name: str) -> TensorInfo:
        return self._where[name].tensors[name].info

    def _read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def locate(self, name: str) -> StoredTensor | None:
        name = self.aliases.get(name, name)
        sf = self._where[name]
        loc = sf.tensors[name]
        return StoredTensor(sf.path, loc.begin, loc.info)

    def prefetch(self, name: str) -> None:
        name = self.aliases.get(name, name)
        self._where[name].prefetch(name)

    def release(self, name: str) -> None:
        name = self.aliases.get(name, name)
        self._where[name].release(name)

    def files(self) -> list[Path]:
        return sorted(sf.path for sf in self._files.values())

    def close(self) -> None:
        for sf in self._files.values():
            sf.close()


class PickleCheckpoint(Checkpoint):
    """A pickled `pytorch_model.bin` checkpoint, loaded with `torch.load(weights_only=True)`."""

    def __init__(self, path: Path, files: list[Path]) -> None:
        import torch

        super().__init__(path)
        self._files = files
        self._tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise RecyclerError(
                    f"{f}: cannot load as a weights-only checkpoint: {str(exc).splitlines()[0]}"
                ) from None
            if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()
            ):
                raise RecyclerError(f"{f}: not a flat state dict of tensors")
            self._tensors.update(state)

    def stored_names(self) -> list[str]:
        return list(self._tensors)

    def _info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo.of(t.shape, t.dtype)

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def files(self) -> list[Path]:
        return list(self._files)


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
        from recycler.pool.lora import LoraCheckpoint  # imports PyTorch

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
        f"{path}: no model weights found (model.safetensors, shards with an index, or a LoRA adapter)"
    )


def _check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise RecyclerError(
            f"{path}: pickled checkpoints can run code when loaded; convert to safetensors or pass --allow-pickle"
        )


def _read_index(index: Path) -> dict[str, str]:
    data = _load_json(index)
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


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RecyclerError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise RecyclerError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RecyclerError(f"{path}: expected a JSON object")
    return data
