"""The evaluation worker: one model resident (and the pool's tensors, unless shard workers
hold them), a recipe in, scores out.

Per trial: merge every tensor in memory from the resident copies
(`merge.resident.ResidentPieces`, the whole pool as whole pieces), copy the result
into the one resident model in place, and hand that model object to lm-eval; or, with
shard workers, copy the pieces they merged into the model (`evaluate_pieces`). Nothing
is written to disk per trial and the pool is read once per worker, not once per trial.

This module is imported inside Ray worker processes; it is a plain class so that it
can be tested and used without Ray (`ray.remote(TrialWorker)` makes the actor).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from recycler.cluster.pieces import assemble, check_complete
from recycler.cluster.placement import actor_facts
from recycler.evaluate.evaluator import EvalResult, describe_failure
from recycler.evaluate.model import ResidentModel
from recycler.evaluate.runner import evaluate_tasks, score_documents
from recycler.evaluate.tasks import SuiteRequest
from recycler.merge.recipe import DTYPES, Recipe
from recycler.merge.resident import ResidentPieces, whole_pieces
from recycler.pool import Pool
from recycler.pool.safetensors_file import torch_dtype

# Documents to score per task (`TaskSuite.doc_ids`); None: the whole split (`limit` applied).
Documents = Mapping[str, Sequence[int]] | None


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, as plain data that pickles to any node."""

    checkpoints: tuple[str, ...]  # absolute paths, in pool order
    base: str | None
    model_dir: str  # config.json + tokenizer of the model the merged tensors go into
    suite: SuiteRequest  # the lm-eval tasks and options every evaluation scores
    limit: int | None
    batch_size: int | str  # an integer, or "auto"
    dtype: str  # the merge's dtype: the resident model is kept in it
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None: torch's default
    hold_pool: bool = (
        True  # False: the pool lives in shard workers (evaluate_pieces), only the model here
    )


class TrialWorker:
    """One evaluation worker: the whole pool resident (unless shard workers hold it) and one
    model."""

    def __init__(self, cfg: WorkerConfig) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        start = time.perf_counter()
        self.resident: ResidentPieces | None = None
        if cfg.hold_pool:
            pool = Pool.open(list(cfg.checkpoints), cfg.base)
            self.resident = ResidentPieces(pool, whole_pieces(pool), cfg.device)
        self.model = ResidentModel(
            Path(cfg.model_dir), device=cfg.device, dtype=torch_dtype(DTYPES[cfg.dtype])
        )
        self.start_seconds = time.perf_counter() - start

    def ready(self) -> dict[str, Any]:
        """Called once after start: proves the worker is up and says what it holds."""
        return actor_facts(
            tensors=len(self.resident.pieces) if self.resident is not None else 0,
            resident_bytes=self.resident.nbytes if self.resident is not None else 0,
            start_seconds=round(self.start_seconds, 3),
        )

    def evaluate(self, recipe: Recipe, split: str, docs: Documents = None) -> EvalResult:
        """Merge, load into the resident model, score with lm-eval. Never raises: failures are
        results."""

        def merge() -> None:
            if self.resident is None:
                raise RuntimeError("this evaluation worker holds no pool: use evaluate_pieces")
            self.model.load_tensors({p.name: t for p, t in self.resident.merge(recipe)})

        return self._merge_and_score(merge, split, docs)

    def evaluate_pieces(
        self, piece_refs: list[Any], split: str, docs: Documents = None
    ) -> EvalResult:
        """Score a merge done by the shard workers: `piece_refs` are their `merge` results
        (Ray ObjectRefs, each a list of MergedPiece); the pieces are copied into the
        resident model in place. Never raises: failures are results."""

        def merge() -> None:
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

        return self._merge_and_score(merge, split, docs)

    def _merge_and_score(
        self, merge: Callable[[], None], split: str, docs: Documents
    ) -> EvalResult:
        """Time `merge` (which puts the merged tensors into the resident model), then score."""
        start = time.perf_counter()
        try:
            merge()
        except BaseException as exc:  # the study goes on whatever one trial did
            return _failure(exc)
        return self._score(split, time.perf_counter() - start, docs)

    def _score(self, split: str, merge_seconds: float, docs: Documents) -> EvalResult:
        """lm-eval on the resident model as it is now: metrics, or with `docs` each of those
        documents' scores."""
        eval_seconds = 0.0
        try:
            start = time.perf_counter()
            if docs is not None:
                scores = score_documents(
                    self.model, self.cfg.suite, split, docs, batch_size=self.cfg.batch_size
                )
                return EvalResult(
                    ok=True,
                    doc_scores=scores,
                    merge_seconds=merge_seconds,
                    eval_seconds=time.perf_counter() - start,
                )
            metrics = evaluate_tasks(
                self.model,
                self.cfg.suite,
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
            return _failure(exc, merge_seconds, eval_seconds)


def _failure(
    exc: BaseException, merge_seconds: float = 0.0, eval_seconds: float = 0.0
) -> EvalResult:
    """`exc` as a failed trial's result; an interrupt or exit is raised on, being no trial's
    failure."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        raise exc
    return EvalResult(
        ok=False,
        merge_seconds=merge_seconds,
        eval_seconds=eval_seconds,
        error=describe_failure(exc),
    )
