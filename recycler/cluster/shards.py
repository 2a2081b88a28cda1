"""The shard plan: which shard worker holds (and merges) which tensors, or rows of a tensor.

The pool's tensors are spread over S shard workers balanced by bytes: greedy, largest
piece first, each into the lightest shard so far (ties: the lower shard index), so the
same pool and S give the same plan everywhere. A tensor larger than a fair share
(total bytes / S, or `max_piece_bytes` when given) is cut into blocks of rows first,
but only for methods whose merge of a row block depends on nothing outside the block
beyond per-tensor constants (the method description's `row_splittable`): TIES' magnitude
trim ranks the WHOLE tensor, so ties and dare_ties keep every tensor whole. DARE draws its
masks per fixed block of rows, so a split dare_linear merge is the same bit for bit.

Pure functions on names, shapes and byte counts: no Ray, no tensors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from recycler.merge.methods import METHODS
from recycler.merge.resident import Piece
from recycler.pool import Pool


@dataclass(frozen=True)
class TensorSize:
    name: str
    shape: tuple[int, ...]
    nbytes: int  # one version's bytes (every checkpoint holds the same shape and dtype)


@dataclass(frozen=True)
class ShardPlan:
    shards: tuple[tuple[Piece, ...], ...]

    @property
    def n_shards(self) -> int:
        return len(self.shards)


def plan_shards(
    tensors: Sequence[TensorSize], n_shards: int, *, method: str, max_piece_bytes: int | None = None
) -> ShardPlan:
    """Split `tensors` over `n_shards` shards balanced by bytes (see the module's doc)."""
    if n_shards < 1:
        raise ValueError("n_shards must be at least 1")
    total = sum(t.nbytes for t in tensors)
    fair = max_piece_bytes if max_piece_bytes is not None else math.ceil(total / n_shards)
    fair = max(1, fair)
    order = {t.name: i for i, t in enumerate(tensors)}
    pieces: list[Piece] = []
    for t in tensors:
        rows = t.shape[0] if t.shape else 0
        if n_shards > 1 and METHODS[method].row_splittable and t.nbytes > fair and rows > 1:
            n_blocks = min(rows, math.ceil(t.nbytes / fair))
            row_bytes = t.nbytes // rows
            bounds = [rows * k // n_blocks for k in range(n_blocks + 1)]
            pieces += [
                Piece(t.name, lo, hi, (hi - lo) * row_bytes, whole=False)
                for lo, hi in itertools.pairwise(bounds)
            ]
        else:
            pieces.append(Piece(t.name, 0, rows, t.nbytes))
    # Largest first; equal sizes in the pool's order, then by row (a total order: deterministic).
    pieces.sort(key=lambda p: (-p.nbytes, order[p.name], p.start))
    loads = [0] * n_shards
    bins: list[list[Piece]] = [[] for _ in range(n_shards)]
    for piece in pieces:
        lightest = min(range(n_shards), key=lambda i: (loads[i], i))
        bins[lightest].append(piece)
        loads[lightest] += piece.nbytes
    # Each shard lists its pieces in the pool's tensor order (rows ascending).
    return ShardPlan(tuple(tuple(sorted(b, key=lambda p: (order[p.name], p.start))) for b in bins))


def pool_sizes(pool: Pool) -> list[TensorSize]:
    """The TensorSize of every tensor of an opened recycler Pool, in its order."""
    out: list[TensorSize] = []
    for name in pool.tensor_names:
        info = pool.info(name)
        out.append(TensorSize(name, tuple(int(s) for s in info.shape), info.nbytes))
    return out
