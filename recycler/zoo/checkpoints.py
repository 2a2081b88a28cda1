"""Write and read the zoo's model directories with the libraries real pools come from.

Full checkpoints go through transformers' `save_pretrained` (safetensors,
sharded with an index when `max_shard_size` says so, in the dtype asked for);
LoRA adapters through peft's `save_pretrained`. Reading back is plain
safetensors, so what the zoo scores is exactly what is on disk.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn


def save_full(
    model: nn.Module, out_dir: Path, dtype: torch.dtype, max_shard_size: str | None
) -> None:
    """A HF model directory of `model` in `dtype`; sharded (+ index) when `max_shard_size` is given."""
    clone: Any = copy.deepcopy(model).to(dtype)
    clone.config.dtype = dtype  # config.json says what the tensors are
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size else {}
    clone.save_pretrained(str(out_dir), **kwargs)


def is_sharded(model_dir: Path) -> bool:
    return (model_dir / "model.safetensors.index.json").is_file()


def read_full(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors model directory, in its stored dtype."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(str(model_dir / name)))
    return out


def stored_dtype(model_dir: Path) -> str:
    """The dtype of the first tensor on disk, e.g. 'bfloat16'."""
    first = next(iter(read_full(model_dir).values()))
    return str(first.dtype).removeprefix("torch.")
