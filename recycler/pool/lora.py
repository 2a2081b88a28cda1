"""A PEFT LoRA adapter dir seen as a full checkpoint: base + delta, tensor by tensor.

For a target module with adapter matrices A (r × in) and B (out × r),
    W = W_base + s · B A,   s = alpha / r   (alpha / sqrt(r) with rsLoRA),
transposed for `fan_in_fan_out` layers; for embeddings PEFT stores
A (r × vocab), B (dim × r) and the delta is s · (B A)ᵀ. Tensors the adapter saves
whole (`modules_to_save`, trained biases) replace the base's. Nothing is merged
ahead of time: a tensor is computed when it is read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recycler.errors import RecyclerError
from recycler.pool.checkpoint import ADAPTER_CONFIG, Checkpoint, StoredTensor
from recycler.pool.safetensors_file import SafetensorsFile, TensorInfo

ADAPTER_WEIGHTS = "adapter_model.safetensors"

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$"
)
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[A-Za-z0-9_]+")


@dataclass
class _Adapter:
    a: str
    b: str
    scaling: float
    embedding: bool


class LoraCheckpoint(Checkpoint):
    def __init__(self, path: Path, base: Checkpoint) -> None:
        super().__init__(path)
        self.base = base
        config_path = path / ADAPTER_CONFIG
        try:
            config: dict[str, Any] = json.loads(config_path.read_text())
        except ValueError as exc:
            raise RecyclerError(f"{config_path}: invalid JSON ({exc})") from None
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise RecyclerError(f"{path}: LoRA adapter without {ADAPTER_WEIGHTS}")
        if config.get("use_dora"):
            raise RecyclerError(f"{config_path}: DoRA adapters are not supported (use_dora: true)")
        self._file = SafetensorsFile(weights)
        self._fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self._adapters: dict[str, _Adapter] = {}
        self._replaced: dict[str, str] = {}  # base tensor name → adapter key saved whole
        parts: dict[str, dict[str, str]] = {}
        for key in self._file.tensors:
            stripped = _MODULES_TO_SAVE.sub("", key.removeprefix(_PREFIX))
            match = _LORA_KEY.match(stripped)
            if match:
                parts.setdefault(match["module"], {})[match["part"]] = key
            elif base.has(stripped):
                self._replaced[stripped] = key
            else:
                raise RecyclerError(f"{weights}: tensor {key}: matches no tensor of the base model")
        for module, found in parts.items():
            embedding = "lora_embedding_A" in found
            a_key = found.get("lora_embedding_A" if embedding else "lora_A")
            b_key = found.get("lora_embedding_B" if embedding else "lora_B")
            target = f"{module}.weight"
            if a_key is None or b_key is None:
                raise RecyclerError(
                    f"{weights}: module {module}: has only one of the two LoRA matrices"
                )
            if not base.has(target):
                raise RecyclerError(
                    f"{weights}: module {module}: the base model has no tensor {target}"
                )
            rank = self._file.tensors[a_key].info.shape[0]
            self._adapters[target] = _Adapter(
                a_key, b_key, _scaling(config, module, rank), embedding
            )
            expected = base.info(target).shape
            if tuple(self._delta_shape(target)) != expected:
                raise RecyclerError(
                    f"{weights}: module {module}: LoRA delta has shape {list(self._delta_shape(target))}, base tensor {target} has {list(expected)}"
                )

    def _delta_shape(self, target: str) -> tuple[int, ...]:
        ad = self._adapters[target]
        a = self._file.tensors[ad.a].info.shape
        b = self._file.tensors[ad.b].info.shape
        shape = (b[0], a[1])
        return shape[::-1] if ad.embedding or self._fan_in_fan_out else shape

    def stored_names(self) -> list[str]:
        return self.base.stored_names()

    def _info(self, name: str) -> TensorInfo:
        base_info = self.base.info(name)
        if name in self._adapters:
            return TensorInfo(base_info.shape, "F32")
        if name in self._replaced:
            return self._file.tensors[self._replaced[name]].info
        return base_info

    def _read(self, name: str) -> torch.Tensor:
        if name in self._replaced:
            return self._file.read(self._replaced[name])
        base = self.base.read(name)
        ad = self._adapters.get(name)
        if ad is None:
            return base
        a = self._file.read(ad.a).float()
        b = self._file.read(ad.b).float()
        delta = b @ a
        if ad.embedding or self._fan_in_fan_out:
            delta = delta.T
        return base.to(torch.float32, copy=True).add_(
            delta, alpha=ad.scaling
        )  # copy: base may be an fp32 view of the file

    def locate(self, name: str) -> StoredTensor | None:
        name = self.aliases.get(name, name)
        if name in self._adapters:
            return None
        if name in self._replaced:
            loc = self._file.tensors[self._replaced[name]]
            return StoredTensor(self._file.path, loc.begin, loc.info)
        return self.base.locate(name)

    def release(self, name: str) -> None:
        self.base.release(name)

    def files(self) -> list[Path]:
        return [self._file.path]

    def config(self) -> dict[str, Any] | None:
        return self.base.config()

    def close(self) -> None:
        self._file.close()


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: a pattern matches the module name or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
