"""The shard worker: its pieces (tensors or row blocks) of every checkpoint resident, merged per recipe.

A `ShardWorker` opens the pool once, reads ITS pieces of every checkpoint (and of the
base and the Fisher files, on first use) and keeps them in RAM, or on its GPU when the
device is cuda. `merge(recipe)` merges each piece with the merge engine's
`merge_tensor` (fp32 accumulation; a row block with its `row_offset`, so the result is
the same bit for bit as merging the whole tensor) and returns the results as
`MergedPiece`s whose data are numpy arrays: Ray puts those in its object store
out-of-band and a reader on the same node maps them without a copy. bfloat16 (which
numpy lacks) travels as its 16 bits, viewed back on arrival.

The evaluation worker assembles the pieces into its resident model with `assemble`.

A plain class, usable and testable without Ray (`ray.remote(ShardWorker)` makes the actor).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recycler.cluster.shards import Piece
from recycler.cluster.worker import placement_facts

if TYPE_CHECKING:
    import numpy as np
    import torch

    from recycler.evaluate.model import ResidentModel


@dataclass(frozen=True)
class ShardConfig:
    """Everything a shard worker needs, as plain data that pickles to any node."""

    checkpoints: tuple[str, ...]  # absolute paths, in pool order
    base: str | None
    pieces: tuple[Piece, ...]
    device: str = "cpu"
    threads: int | None = None


@dataclass(frozen=True)
class MergedPiece:
    """Rows [start, start + len(data)) of merged tensor `name` (all of it when `whole`)."""

    name: str
    start: int
    whole: bool
    dtype: str  # torch dtype name without the "torch." prefix
    data: np.ndarray

    def tensor(self) -> torch.Tensor:
        """A torch view of the data (read-only memory when it came from Ray's object store)."""
        import torch

        with warnings.catch_warnings():
            # Arrays from the object store are read-only; the view is only ever read.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(self.data)
        dtype = getattr(torch, self.dtype)
        return t.view(dtype) if t.dtype != dtype else t


_WIRE = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


def to_piece(name: str, start: int, whole: bool, tensor: torch.Tensor) -> MergedPiece:
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    t = tensor.detach().to("cpu").contiguous()
    if dtype in _WIRE:
        t = t.view(getattr(torch, _WIRE[dtype]))
    return MergedPiece(name, start, whole, dtype, t.numpy())


class ShardWorker:
    """One shard worker: its pieces of every checkpoint resident; merge(recipe) -> MergedPieces."""

    def __init__(self, cfg: ShardConfig) -> None:
        import torch

        from recycler.pool import Pool

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        start = time.perf_counter()
        self.pool = Pool.open(list(cfg.checkpoints), cfg.base)
        self.pieces = list(cfg.pieces)
        self.versions: dict[Piece, list[torch.Tensor]] = {
            p: [self._read(ckpt, p) for ckpt in self.pool.checkpoints] for p in self.pieces
        }
        self._base: dict[Piece, torch.Tensor] | None = None
        self._fishers: dict[Piece, list[torch.Tensor]] | None = None
        self.load_seconds = time.perf_counter() - start

    def _read(self, source: Any, piece: Piece) -> torch.Tensor:
        """`source`'s (a Checkpoint or FisherFile) piece, on this worker's device."""
        if piece.whole:
            return source.read(piece.name, self.cfg.device)
        # The rows only (a copy, so the rest of the tensor is not kept), then to the device.
        return source.read(piece.name, "cpu")[piece.start : piece.stop].clone().to(self.cfg.device)

    def ready(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "pieces": len(self.pieces),
            "resident_bytes": self.nbytes,
            "start_seconds": round(self.load_seconds, 3),
            **placement_facts(),
        }

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for vs in self.versions.values() for t in vs)

    def _base_tensors(self) -> dict[Piece, torch.Tensor]:
        if self._base is None:  # read on first use: a linear search never needs the base
            base = self.pool.base
            self._base = {p: self._read(base, p) for p in self.pieces} if base is not None else {}
        return self._base

    def _fisher_tensors(self) -> dict[Piece, list[torch.Tensor]]:
        if self._fishers is None:
            from recycler.merge.fisher import open_fishers

            sources = open_fishers(self.pool)
            self._fishers = {p: [self._read(f, p) for f in sources] for p in self.pieces}
        return self._fishers

    def merge(self, recipe_dict: dict[str, Any]) -> list[MergedPiece]:
        """This shard's merged pieces for the recipe (a Recipe dict), in the recipe's dtype."""
        return [to_piece(p.name, p.start, p.whole, t) for p, t in self.merge_tensors(recipe_dict)]

    def merge_tensors(self, recipe_dict: dict[str, Any]) -> list[tuple[Piece, torch.Tensor]]:

        from recycler.errors import RecyclerError
        from recycler.merge.engine import merge_tensor
        from recycler.merge.methods import METHODS, NonFiniteError
        from recycler.merge.recipe import Recipe

        recipe = Recipe.from_dict(recipe_dict, where="trial recipe")
        if len(recipe.models) != len(self.pool.checkpoints):
            raise RecyclerError(
                f"the recipe lists {len(recipe.models)} models but the pool has {len(self.pool.checkpoints)}"
            )
        method = METHODS[recipe.merge_method]
        if not method.row_splittable and (
            split := next((p for p in self.pieces if not p.whole), None)
        ):
            raise RecyclerError(
                f"tensor {split.name}: {method.name} needs whole tensors, but the shard plan split its rows"
            )
        if method.needs_base and self.pool.base is None:
            raise RecyclerError(f"{method.name} needs a base model")
        base = self._base_tensors() if method.uses_base else {}
        fishers = self._fisher_tensors() if method.uses_fishers else {}
        out: list[tuple[Piece, torch.Tensor]] = []
        for p in self.pieces:
            try:
                merged = merge_tensor(
                    recipe,
                    p.name,
                    self.versions[p],
                    base.get(p),
                    n_layers=self.pool.n_layers,
                    fishers=fishers.get(p, ()),
                    row_offset=p.start,
                )
            except NonFiniteError:
                # merge_tensor's guarantee: what it returns is finite, so no second pass here.
                raise RecyclerError(
                    f"tensor {p.name}: the merge has non-finite values (NaN or inf)"
                ) from None
            out.append((p, merged))
        return out


def assemble(model: ResidentModel, pieces: Iterable[MergedPiece]) -> set[str]:
    """Copy merged pieces into the resident model in place; the names written (row blocks by rows)."""
    import torch

    from recycler.errors import RecyclerError

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
                f"tensor {piece.name!r}: rows {piece.start}+{tuple(value.shape)} do not fit the model's {tuple(slot.shape)}"
            )
        with torch.no_grad():
            slot[piece.start : piece.start + value.shape[0]].copy_(value)
    return set(whole) | {p.name for p in blocks}


def check_complete(model: ResidentModel, names: Sequence[str]) -> None:
    """RecyclerError unless every tensor of the model was written."""
    from recycler.errors import RecyclerError

    given = {model.owner(n) for n in names}
    if missing := [n for n in model.tensor_names if n not in given]:
        raise RecyclerError(
            f"missing tensors for the model in {model.model_dir}: {', '.join(missing[:3])}"
        )
