"""Checkpoint discovery, the tensor index, lazy reads and compatibility checks; safetensors
files read (`safetensors_file`) and written (`safetensors_writer`)."""

from recycler.pool.checkpoint import Checkpoint, StoredTensor, TrainerState
from recycler.pool.pool import Pool
from recycler.pool.safetensors_file import TensorInfo

__all__ = ["Checkpoint", "Pool", "StoredTensor", "TensorInfo", "TrainerState"]
