"""The search's Evaluator on Ray: a set of TrialWorker actors, one trial in flight on each.

With no `cluster.address` the search starts a local cluster of its own, so the laptop, CI
and a GPU cluster run this same code; `cluster.address` ("auto", "HOST:PORT", "ray://…")
joins an existing one (`connect.py`: which, and within what time). When Ray is already
initialised in this process (a test session) it is reused and left running on close.

A worker whose process dies is restarted by Ray (`max_restarts`) and the call it was
serving is retried once (`max_task_retries`); if that fails too the trial fails with
the reason and a fresh worker takes the slot, so the study goes on.

`cluster.placement` other than `none` reserves one Ray placement group for all the
workers of the search (`placement.py`); a replacement worker takes the dead one's bundle.

The search parses a trial's recipe once; that typed `Recipe` is what crosses to the
workers. The task suite is the prepared study's (`Prepared.suite`), pinned here to the
task files this host resolved so that every worker scores the same tasks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group

from recycler.cluster.connect import start_ray, stop_ray
from recycler.cluster.placement import PLACEMENT_TIMEOUT_S, PLACEMENTS, in_bundle, reserve
from recycler.cluster.shard_worker import ShardConfig, ShardWorker
from recycler.cluster.shards import plan_shards, pool_sizes
from recycler.cluster.worker import TrialWorker, WorkerConfig
from recycler.config import CONNECT_TIMEOUT_S
from recycler.errors import RecyclerError
from recycler.evaluate.evaluator import EvalResult
from recycler.evaluate.tasks import SuiteRequest, pinned_request
from recycler.merge.recipe import Recipe
from recycler.pool import Pool


class RayEvaluator:
    def __init__(
        self,
        cfg: WorkerConfig,
        *,
        address: str | None,
        n_workers: int,
        gpus_per_worker: float,
        shard_workers: int = 1,
        merge_method: str = "linear",
        max_piece_bytes: int | None = None,
        placement: str = "none",
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        """`shard_workers` > 1: the pool lives in that many ShardWorker actors, split by a
        shard plan for `merge_method` (`max_piece_bytes` caps a piece, else a fair share);
        the evaluation workers then hold only the model. `placement`: see the module doc."""
        if placement not in PLACEMENTS:
            raise RecyclerError(
                f"cluster.placement: must be one of {', '.join(PLACEMENTS)}, got {placement!r}"
            )
        self._idle: list[Any] = []
        self._pending: dict[Any, tuple[int, Any]] = {}
        self._shards: list[Any] = []
        self._placement_group: Any = None
        self._bundle_of: dict[
            Any, int
        ] = {}  # evaluation worker → its bundle in the placement group
        self._started = start_ray(address, connect_timeout_s)
        sharded = shard_workers > 1
        self.cfg = WorkerConfig(**{**cfg.__dict__, "hold_pool": False}) if sharded else cfg
        self.n_workers = n_workers
        resources = ray.cluster_resources()
        cpus = float(resources.get("CPU", 1.0))
        # Split the CPUs between the workers (a fraction each when there are more workers
        # than CPUs, so that they all start). Torch gets one thread fewer than the share:
        # the driver, Ray and lm-eval's Python need a core, and an oversubscribed torch
        # spins: on 2 busy cores a small model scored in 25 s with 2 threads, 1.4 s with 1.
        actors = n_workers + (shard_workers if sharded else 0)
        share = cpus / actors
        self.cpus_per_worker: float = float(int(share)) if share >= 1 else share
        self.threads = max(1, int(share) - 1)
        self.gpus_per_worker = gpus_per_worker
        gpus = float(resources.get("GPU", 0.0))
        if gpus_per_worker * actors > gpus and address is None:
            # A local cluster never grows: the workers would wait for GPUs forever.
            self.close()
            raise RecyclerError(
                f"cluster.gpus_per_worker: {actors} worker(s) × {gpus_per_worker} GPU need "
                f"{gpus_per_worker * actors:g} GPUs; this machine's Ray sees {gpus:g}"
            )
        self._remote = ray.remote(TrialWorker)
        n_shards = shard_workers if sharded else 0
        try:
            if placement != "none":
                bundle = {
                    "CPU": self.cpus_per_worker,
                    **({"GPU": gpus_per_worker} if gpus_per_worker else {}),
                }
                self._placement_group = reserve(placement, actors, bundle, placement_timeout_s)
            if sharded:
                self._shards, self.shard_infos = self._start_shards(
                    shard_workers, merge_method, max_piece_bytes
                )
            self._idle = [self._spawn(n_shards + i) for i in range(n_workers)]
            self.infos = self._wait_ready(self._idle)
        except BaseException:
            self.close()
            raise

    def _start_shards(
        self, n_shards: int, merge_method: str, max_piece_bytes: int | None
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        pool = Pool.open(list(self.cfg.checkpoints), self.cfg.base)  # headers only
        self.plan = plan_shards(
            pool_sizes(pool), n_shards, method=merge_method, max_piece_bytes=max_piece_bytes
        )
        remote: Any = ray.remote(ShardWorker)
        shards: list[Any] = [
            # A shard worker that dies is restarted (reloading its pieces) and the merge it
            # was serving is retried once, like an evaluation worker's trial.
            remote.options(
                num_cpus=self.cpus_per_worker,
                num_gpus=self.gpus_per_worker,
                max_restarts=2,
                max_task_retries=1,
                **in_bundle(self._placement_group, i),
            ).remote(
                ShardConfig(
                    self.cfg.checkpoints, self.cfg.base, pieces, self.cfg.device, self.threads
                )
            )
            for i, pieces in enumerate(self.plan.shards)
        ]
        try:
            return shards, list(ray.get([s.ready.remote() for s in shards]))
        except ray.exceptions.RayActorError as exc:
            for s in shards:
                ray.kill(s)
            raise RecyclerError(f"a shard worker could not start: {_cause(exc)}") from None

    @classmethod
    def from_spec(cls, spec: Any, pool: Any, suite: SuiteRequest) -> RayEvaluator:
        """From a StudySpec, its opened Pool and its task suite (`Prepared.suite`)."""
        gpus = float(spec.cluster.gpus_per_worker)
        cfg = WorkerConfig(
            checkpoints=tuple(str(c.path.resolve()) for c in pool.checkpoints),
            base=str(pool.base.path.resolve()) if pool.base is not None else None,
            model_dir=str(pool.config_dir.resolve()),
            suite=pinned_request(suite),
            limit=spec.eval.limit,
            batch_size=spec.eval.batch_size,
            dtype=spec.merge.dtype,
            device="cuda" if gpus > 0 else "cpu",
        )
        return cls(
            cfg,
            address=spec.cluster.address,
            n_workers=spec.cluster.eval_workers,
            gpus_per_worker=gpus,
            shard_workers=spec.cluster.shard_workers,
            merge_method=spec.merge.method,
            placement=spec.cluster.placement,
            connect_timeout_s=spec.cluster.connect_timeout_s,
        )

    def _spawn(self, bundle_index: int) -> Any:
        cfg = WorkerConfig(**{**self.cfg.__dict__, "threads": self.threads})
        actor = self._remote.options(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            max_restarts=2,
            max_task_retries=1,
            **in_bundle(self._placement_group, bundle_index),
        ).remote(cfg)
        self._bundle_of[actor] = bundle_index
        return actor

    def _wait_ready(self, actors: list[Any]) -> list[dict[str, Any]]:
        try:
            return list(ray.get([a.ready.remote() for a in actors]))
        except ray.exceptions.RayActorError as exc:
            raise RecyclerError(f"an evaluation worker could not start: {_cause(exc)}") from None

    @property
    def capacity(self) -> int:
        return self.n_workers

    def submit(
        self,
        ticket: int,
        recipe: Recipe,
        split: str,
        docs: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        if not self._idle:
            raise RuntimeError(
                "submit with every worker busy: the caller keeps one trial per worker"
            )
        actor = self._idle.pop()
        if self._shards:
            # Every shard worker merges its pieces; the evaluation worker fetches them (nested
            # refs, so it sees a failed shard as its own error and fetches one shard at a time).
            pieces = [s.merge.remote(recipe) for s in self._shards]
            ref = actor.evaluate_pieces.remote(pieces, split, docs)
        else:
            ref = actor.evaluate.remote(recipe, split, docs)
        self._pending[ref] = (ticket, actor)

    def wait(self) -> list[tuple[int, EvalResult]]:
        if not self._pending:
            return []
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        more, _ = (
            ray.wait(
                [r for r in self._pending if r not in ready],
                num_returns=len(self._pending) - 1,
                timeout=0,
            )
            if len(self._pending) > 1
            else ([], [])
        )
        out: list[tuple[int, EvalResult]] = []
        for ref in [*ready, *more]:
            ticket, actor = self._pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                result = EvalResult(ok=False, error=f"evaluation worker died: {_cause(exc)}")
                ray.kill(actor, no_restart=True)
                actor = self._spawn(self._bundle_of.pop(actor))
                self._wait_ready([actor])
            except ray.exceptions.RayError as exc:
                result = EvalResult(ok=False, error=f"{type(exc).__name__}: {_cause(exc)}")
            self._idle.append(actor)
            out.append((ticket, result))
        return out

    def close(self) -> None:
        if not ray.is_initialized():
            return
        for actor in [*self._idle, *(a for _, a in self._pending.values()), *self._shards]:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor)
        self._idle, self._pending, self._shards = [], {}, []
        if self._placement_group is not None:
            with contextlib.suppress(Exception):  # the cluster may be gone already
                remove_placement_group(self._placement_group)
            self._placement_group = None
        if self._started:
            stop_ray()
            self._started = False


def _cause(exc: BaseException) -> str:
    """The last meaningful line of a Ray error (its own text wraps the remote traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~", "Traceback")):
            return line[:500]
    return type(exc).__name__
