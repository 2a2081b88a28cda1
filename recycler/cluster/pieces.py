"""Merged pieces on their way from the shard workers into the evaluation worker's model.

A shard worker returns its merged pieces as `MergedPiece`s whose data are numpy arrays:
Ray puts those in its object store out-of-band and a reader on the same node maps them
without a copy. bfloat16 and float8 (which numpy lacks) travel as their bits, viewed
back on arrival. The evaluation worker copies them into its resident model with
`assemble` and checks with `check_complete` that every tensor was written.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recycler.errors import RecyclerError
from recycler.evaluate.model import ResidentModel
from recycler.merge.resident import Piece

# Torch dtypes numpy has no type for → the numpy-known integer type of the same width.
_WIRE = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


@dataclass(frozen=True)
class MergedPiece:
    """Rows [start, start + len(data)) of merged tensor `name` (all of it when `whole`)."""

    name: str
    start: int
    whole: bool
    dtype: str  # torch dtype name without the "torch." prefix
    data: np.ndarray

    @classmethod
    def of(cls, piece: Piece, tensor: torch.Tensor) -> MergedPiece:
        """`tensor`, the merge of `piece`, ready to travel (on the CPU, as numpy)."""
        dtype = str(tensor.dtype).removeprefix("torch.")
        t = tensor.detach().to("cpu").contiguous()
        if dtype in _WIRE:
            t = t.view(getattr(torch, _WIRE[dtype]))
        return cls(piece.name, piece.start, piece.whole, dtype, t.numpy())

    def tensor(self) -> torch.Tensor:
        """A torch view of the data (read-only memory when it came from Ray's object store)."""
        with warnings.catch_warnings():
            # Arrays from the object store are read-only; the view is only ever read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(self.data)
        dtype = getattr(torch, self.dtype)
        return t.view(dtype) if t.dtype != dtype else t


def assemble(model: ResidentModel, pieces: Iterable[MergedPiece]) -> set[str]:
    """Copy merged pieces into the resident model in place; the names written (row blocks by
    rows)."""
    pieces = list(pieces)
    names = {p.name for p in pieces}
    whole: dict[str, torch.Tensor] = {}
    blocks: list[MergedPiece] = []
    for piece in pieces:
        if piece.whole:
            whole[piece.name] = piece.tensor()
        else:
            blocks.append(piece)
    model.load_tensors(whole, strict=False)
    slots = model.state_dict()
    for piece in blocks:
        owner = model.owner(piece.name)
        if owner != piece.name and owner in names:
            continue  # a tied alias: the owner's own value wins (as in load_tensors)
        if owner not in slots:
            raise RecyclerError(
                f"tensor {piece.name!r} is not a tensor of the model in {model.model_dir}"
            )
        value = piece.tensor()
        slot = slots[owner]
        if piece.start + value.shape[0] > slot.shape[0] or tuple(value.shape[1:]) != tuple(
            slot.shape[1:]
        ):
            raise RecyclerError(
                f"tensor {piece.name!r}: rows {piece.start}+{tuple(value.shape)} do not fit the "
                f"model's {tuple(slot.shape)}"
            )
        with torch.no_grad():
            slot[piece.start : piece.start + value.shape[0]].copy_(value)
    return set(whole) | {p.name for p in blocks}


def check_complete(model: ResidentModel, names: Sequence[str]) -> None:
    """RecyclerError unless every tensor of the model was written."""
    given = {model.owner(n) for n in names}
    if missing := [n for n in model.tensor_names if n not in given]:
        raise RecyclerError(
            f"missing tensors for the model in {model.model_dir}: {', '.join(missing[:3])}"
        )
