"""Checkpoint discovery, the tensor index, lazy reads and compatibility checks."""

from recycler.pool.checkpoint import Checkpoint, TrainerState
from recycler.pool.pool import Pool
from recycler.pool.safetensors_file import TensorInfo

__all__ = ["Checkpoint", "Pool", "TensorInfo", "TrainerState"]
