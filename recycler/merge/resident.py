"""The pool's tensors kept in memory and merged per recipe: every in-memory merge of a search.

A `ResidentPieces` reads its pieces of every checkpoint once (and those of the base and
of the Fisher files on first use: a linear search never needs them) and keeps them in
RAM, or on the GPU when the device is cuda. `merge(recipe)` merges each piece with the
engine's `merge_tensor`, fp32 accumulation, and returns the results in the recipe's
dtype. Nothing is read from disk per merge.

A piece is a whole tensor or a block of its rows. An evaluation worker that holds the
whole pool holds every tensor as one whole piece (`whole_pieces`); a shard worker holds
its share of a shard plan. A row block merges with its `row_offset`, so its result is
bit for bit those rows of the whole tensor's merge; only methods whose merge is
row-wise (the method description's `row_splittable`) accept split pieces.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recycler.errors import RecyclerError
from recycler.merge.engine import check_fits, merge_tensor
from recycler.merge.fisher import FisherFile, open_fishers
from recycler.merge.methods import METHODS
from recycler.merge.recipe import Recipe
from recycler.pool import Checkpoint, Pool

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, order=True)
class Piece:
    """Rows [start, stop) of tensor `name` (the whole tensor when `whole`)."""

    name: str
    start: int
    stop: int
    nbytes: int  # one version's bytes of these rows
    whole: bool = True

    @property
    def rows(self) -> int:
        return self.stop - self.start


def whole_pieces(pool: Pool) -> list[Piece]:
    """Every tensor of the pool as one whole piece, in the pool's order."""
    out: list[Piece] = []
    for name in pool.tensor_names:
        info = pool.info(name)
        rows = int(info.shape[0]) if info.shape else 0
        out.append(Piece(name, 0, rows, info.nbytes))
    return out


class ResidentPieces:
    """Every checkpoint's version of some pieces of the pool, read once, kept on `device`."""

    def __init__(self, pool: Pool, pieces: Sequence[Piece], device: str = "cpu") -> None:
        self.pool = pool
        self.pieces = list(pieces)
        self.device = device
        start = time.perf_counter()
        self.versions: dict[Piece, list[torch.Tensor]] = {
            p: [self._read(ckpt, p) for ckpt in pool.checkpoints] for p in self.pieces
        }
        self._base: dict[Piece, torch.Tensor] | None = None
        self._fishers: dict[Piece, list[torch.Tensor]] | None = None
        self.load_seconds = time.perf_counter() - start

    @property
    def nbytes(self) -> int:
        """The bytes the checkpoints' versions hold (the base and Fishers, read on demand,
        aside)."""
        return sum(t.numel() * t.element_size() for vs in self.versions.values() for t in vs)

    def merge(self, recipe: Recipe) -> list[tuple[Piece, torch.Tensor]]:
        """Each piece's merge for `recipe`, in the recipe's dtype, in this object's piece order."""
        check_fits(self.pool, recipe)
        method = METHODS[recipe.merge_method]
        split = next((p for p in self.pieces if not p.whole), None)
        if split is not None and not method.row_splittable:
            raise RecyclerError(
                f"tensor {split.name}: {method.name} needs whole tensors, but the shard plan split "
                "its rows"
            )
        base = self._base_versions() if method.uses_base else {}
        fishers = self._fisher_versions() if method.needs_fishers else {}
        return [
            (
                p,
                merge_tensor(
                    recipe,
                    p.name,
                    self.versions[p],
                    base.get(p),
                    pool=self.pool,
                    fishers=fishers.get(p, ()),
                    row_offset=p.start,
                ),
            )
            for p in self.pieces
        ]

    def _read(self, source: Checkpoint | FisherFile, piece: Piece) -> torch.Tensor:
        """`source`'s version of the piece, on this object's device."""
        if piece.whole:
            return source.read(piece.name, self.device)
        # The rows only (a copy, so the rest of the tensor is not kept), then to the device.
        return source.read(piece.name, "cpu")[piece.start : piece.stop].clone().to(self.device)

    def _base_versions(self) -> dict[Piece, torch.Tensor]:
        if self._base is None:
            # check_fits: a method that needs a base has one; an optional base may be absent
            base = self.pool.base
            self._base = {p: self._read(base, p) for p in self.pieces} if base is not None else {}
        return self._base

    def _fisher_versions(self) -> dict[Piece, list[torch.Tensor]]:
        if self._fishers is None:
            sources = open_fishers(self.pool)
            self._fishers = {p: [self._read(f, p) for f in sources] for p in self.pieces}
        return self._fishers
