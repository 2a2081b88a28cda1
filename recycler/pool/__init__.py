"""Checkpoint discovery, the tensor index, lazy reads and compatibility checks."""

from recycler.pool.checkpoint import Checkpoint, StoredTensor, TrainerState
from recycler.pool.pool import Pool
from recycler.pool.safetensors_file import TensorInfo

__all__ = ["Checkpoint", "Pool", "StoredTensor", "TensorInfo", "TrainerState"]
