"""The trial worker: the pool's tensors and one model resident, a recipe in, scores out.

Per trial: merge every tensor in memory from the resident copies (the merge engine's
`merge_tensor`, fp32 accumulation), copy the result into the one resident model in
place, and hand that model object to lm-eval. Nothing is written to disk per trial and
the pool is read once per worker, not once per trial.

`ResidentShard` holds the tensors of a set of names; today a worker holds one shard
with every name. Issue 5's shard workers hold one shard each and the eval workers only
the model, with the same two classes.

This module is imported inside Ray worker processes; it is a plain class so that it
can be tested and used without Ray (`ray.remote(TrialWorker)` makes the actor).
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from recycler.search.evaluator import EvalResult


def placement_facts() -> dict[str, Any]:
    """Where Ray placed the calling actor: its node and placement group (None outside one)."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "placement_group": context.get_placement_group_id()}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, as plain data that pickles to any node."""

    checkpoints: tuple[str, ...]  # absolute paths, in pool order
    base: str | None
    model_dir: str  # config.json + tokenizer of the model the merged tensors go into
    tasks_dir: str
    tasks: tuple[str, ...]
    limit: int | None
    batch_size: int
    dtype: str  # the merge's dtype: the resident model is kept in it
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: torch's default
    hold_pool: bool = (
        True  # False: the pool lives in shard workers (evaluate_pieces), only the model here
    )


class ResidentShard:
    """Every checkpoint's (and the base's) version of some tensors, read once, kept in memory."""

    def __init__(self, pool: Any, names: Sequence[str], device: str = "cpu") -> None:
        self.pool = pool
        self.names = list(names)
        self.device = device
        start = time.perf_counter()
        self.versions: dict[str, list[Any]] = {
            name: [ckpt.read(name, device) for ckpt in pool.checkpoints] for name in self.names
        }
        self._base: dict[str, Any] | None = None
        self._fishers: dict[str, list[Any]] | None = None
        self.load_seconds = time.perf_counter() - start

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for vs in self.versions.values() for t in vs)

    def _base_tensors(self) -> dict[str, Any]:
        # Read on first use: a linear search never needs the base in memory.
        if self._base is None:
            base = self.pool.base
            self._base = (
                {name: base.read(name, self.device) for name in self.names}
                if base is not None
                else {}
            )
        return self._base

    def _fisher_tensors(self) -> dict[str, list[Any]]:
        if self._fishers is None:
            from recycler.merge.fisher import open_fishers

            sources = open_fishers(self.pool)
            self._fishers = {
                name: [f.read(name, self.device) for f in sources] for name in self.names
            }
        return self._fishers

    def merge(self, recipe: Any) -> dict[str, Any]:
        """The merged tensors for `recipe` (a recycler Recipe), in the recipe's dtype."""

        from recycler.errors import RecyclerError
        from recycler.merge.engine import merge_tensor
        from recycler.merge.methods import METHODS, NonFiniteError

        if len(recipe.models) != len(self.pool.checkpoints):
            raise RecyclerError(
                f"the recipe lists {len(recipe.models)} models but the pool has {len(self.pool.checkpoints)}"
            )
        method = METHODS[recipe.merge_method]
        base = self._base_tensors() if method.uses_base else {}
        fishers = self._fisher_tensors() if method.uses_fishers else {}
        out: dict[str, Any] = {}
        for name in self.names:
            try:
                merged = merge_tensor(
                    recipe,
                    name,
                    self.versions[name],
                    base.get(name),
                    n_layers=self.pool.n_layers,
                    fishers=fishers.get(name, ()),
                )
            except NonFiniteError:
                # merge_tensor's guarantee: what it returns is finite, so no second pass here.
                raise RecyclerError(
                    f"tensor {name}: the merge has non-finite values (NaN or inf)"
                ) from None
            out[name] = merged
        return out


class TrialWorker:
    """One evaluation worker: a resident shard of the whole pool and one resident model."""

    def __init__(self, cfg: WorkerConfig) -> None:
        import torch

        from recycler.evaluate.model import ResidentModel
        from recycler.merge.recipe import DTYPES
        from recycler.pool import Pool
        from recycler.pool.safetensors_file import torch_dtype

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        start = time.perf_counter()
        self.shard: ResidentShard | None = None
        if cfg.hold_pool:
            self.pool = Pool.open(list(cfg.checkpoints), cfg.base)
            self.shard = ResidentShard(self.pool, self.pool.tensor_names, cfg.device)
        from pathlib import Path

        self.model = ResidentModel(
            Path(cfg.model_dir), device=cfg.device, dtype=torch_dtype(DTYPES[cfg.dtype])
        )
        self.start_seconds = time.perf_counter() - start

    def ready(self) -> dict[str, Any]:
        """Called once after start: proves the worker is up and says what it holds."""
        return {
            "pid": os.getpid(),
            "tensors": len(self.shard.names) if self.shard is not None else 0,
            "resident_bytes": self.shard.nbytes if self.shard is not None else 0,
            "start_seconds": round(self.start_seconds, 3),
            **placement_facts(),
        }

    def evaluate(self, recipe_dict: dict[str, Any], split: str) -> EvalResult:
        """Merge, load into the resident model, score with lm-eval. Never raises: failures are results."""
        merge_seconds = eval_seconds = 0.0
        try:
            from recycler.merge.recipe import Recipe

            if self.shard is None:
                raise RuntimeError("this evaluation worker holds no pool: use evaluate_pieces")
            start = time.perf_counter()
            recipe = Recipe.from_dict(recipe_dict, where="trial recipe")
            merged = self.shard.merge(recipe)
            self.model.load_tensors(merged)
            del merged
            merge_seconds = time.perf_counter() - start
            return self._score(split, merge_seconds)
        except BaseException as exc:  # the study goes on whatever one trial did
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return EvalResult(
                ok=False,
                merge_seconds=merge_seconds,
                eval_seconds=eval_seconds,
                error=describe_failure(exc),
            )

    def evaluate_pieces(self, piece_refs: list[Any], split: str) -> EvalResult:
        """Score a merge done by the shard workers: `piece_refs` are their `merge` results
        (Ray ObjectRefs, each a list of MergedPiece); the pieces are copied into the
        resident model in place. Never raises: failures are results."""
        merge_seconds = 0.0
        try:
            import ray

            from recycler.cluster.shard_worker import assemble, check_complete

            start = time.perf_counter()
            written: set[str] = set()
            # One shard's pieces at a time: each is released before the next is fetched.
            for ref in piece_refs:
                try:
                    pieces = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise (exc.cause if isinstance(exc.cause, BaseException) else exc) from None
                written |= assemble(self.model, pieces)
                del pieces
            check_complete(self.model, sorted(written))
            merge_seconds = time.perf_counter() - start
            return self._score(split, merge_seconds)
        except BaseException as exc:  # the study goes on whatever one trial did
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return EvalResult(ok=False, merge_seconds=merge_seconds, error=describe_failure(exc))

    def _score(self, split: str, merge_seconds: float) -> EvalResult:
        """lm-eval on the resident model as it is now."""
        eval_seconds = 0.0
        try:
            from pathlib import Path

            from recycler.evaluate.runner import evaluate_tasks

            start = time.perf_counter()
            metrics = evaluate_tasks(
                self.model,
                Path(self.cfg.tasks_dir),
                list(self.cfg.tasks),
                split,
                limit=self.cfg.limit,
                batch_size=self.cfg.batch_size,
            )
            eval_seconds = time.perf_counter() - start
            clean = {
                task: {
                    k: float(v)
                    for k, v in values.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
                for task, values in metrics.items()
            }
            return EvalResult(
                ok=True, metrics=clean, merge_seconds=merge_seconds, eval_seconds=eval_seconds
            )
        except BaseException as exc:  # the study goes on whatever one trial did
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return EvalResult(
                ok=False,
                merge_seconds=merge_seconds,
                eval_seconds=eval_seconds,
                error=describe_failure(exc),
            )


def describe_failure(exc: BaseException) -> str:
    """One line for a trial's fail_reason: what failed and where, without a traceback dump."""
    from recycler.errors import RecyclerError

    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if (
        isinstance(exc, MemoryError)
        or "OutOfMemoryError" in name
        or "out of memory" in text.lower()
    ):
        return f"out of memory: {text or name}"
    if isinstance(exc, RecyclerError):
        return text
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{name}: {text}{where}"


def finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)
