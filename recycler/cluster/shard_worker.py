"""The shard worker: its pieces (tensors or row blocks) of every checkpoint resident, merged per
recipe.

A `ShardWorker` opens the pool once and keeps ITS pieces of the shard plan resident
(`merge.resident.ResidentPieces`: in RAM, or on its GPU when the device is cuda).
`merge(recipe)` returns the merged pieces as `pieces.MergedPiece`s, which the
evaluation worker fetches from Ray's object store and assembles into its model.

A plain class, usable and testable without Ray (`ray.remote(ShardWorker)` makes the actor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from recycler.cluster.pieces import MergedPiece
from recycler.cluster.placement import actor_facts
from recycler.merge.recipe import Recipe
from recycler.merge.resident import Piece, ResidentPieces
from recycler.pool import Pool


@dataclass(frozen=True)
class ShardConfig:
    """Everything a shard worker needs, as plain data that pickles to any node."""

    checkpoints: tuple[str, ...]  # absolute paths, in pool order
    base: str | None
    pieces: tuple[Piece, ...]
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: torch's default


class ShardWorker:
    """One shard worker: its pieces of every checkpoint resident; merge(recipe) -> MergedPieces."""

    def __init__(self, cfg: ShardConfig) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.resident = ResidentPieces(
            Pool.open(list(cfg.checkpoints), cfg.base), cfg.pieces, cfg.device
        )

    def ready(self) -> dict[str, Any]:
        """Called once after start: proves the worker is up and says what it holds."""
        return actor_facts(
            pieces=len(self.resident.pieces),
            resident_bytes=self.resident.nbytes,
            start_seconds=round(self.resident.load_seconds, 3),
        )

    def merge(self, recipe: Recipe) -> list[MergedPiece]:
        """This shard's merged pieces for the recipe, in the recipe's dtype."""
        return [MergedPiece.of(p, t) for p, t in self.resident.merge(recipe)]
