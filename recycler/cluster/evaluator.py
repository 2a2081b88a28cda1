"""The search's Evaluator on Ray: a set of TrialWorker actors, one trial in flight on each.

`ray.init()` with no address starts a local cluster, so the laptop, CI and a GPU cluster
run this same code; `cluster.address` ("auto", "ray://…") joins an existing one. When
Ray is already initialised in this process (a test session, a Ray job) it is reused and
left running on close.

A worker whose process dies is restarted by Ray (`max_restarts`) and the call it was
serving is retried once (`max_task_retries`); if that fails too the trial fails with
the reason and a fresh worker takes the slot, so the study goes on.

`cluster.placement` other than `none` reserves one Ray placement group for all the
workers of the search (one bundle per shard and evaluation worker) with that strategy:
`pack`/`strict_pack` keep the pool's shards next to the models they feed (the merged
tensors then move through one node's shared-memory object store, not the network),
`spread`/`strict_spread` put them on different nodes. A replacement worker takes the
dead one's bundle.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Sequence
from typing import Any

from recycler.cluster.worker import TrialWorker, WorkerConfig
from recycler.errors import RecyclerError
from recycler.search.evaluator import EvalResult

RAY_NAMESPACE = "recycler"
PLACEMENTS = ("none", "pack", "strict_pack", "spread", "strict_spread")
# How long to wait for a placement group's resources before giving up: a cluster that
# autoscales may need minutes to add a node; one that cannot fit the group never will.
PLACEMENT_TIMEOUT_S = 600.0


def start_ray(address: str | None) -> bool:
    """Connect to (address) or start (None) a Ray cluster; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "namespace": RAY_NAMESPACE,
        "log_to_driver": False,  # lm-eval's per-trial logging would drown the progress bar
        "logging_level": logging.WARNING,
    }
    if address is None:
        # A local cluster: no Ray dashboard server (recycler has optuna-dashboard for that).
        kwargs["include_dashboard"] = False
    # ray.init installs its own SIGTERM handler over the process's; the `recycler` command's
    # (SIGTERM → SystemExit, so in-flight trials are failed and re-queued on the way out) is
    # put back, else a terminated search dies with SIGABRT after Ray's handler runs.
    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals} if main_thread else {}
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise RecyclerError(f"cluster.address: cannot connect to Ray at {address}: {exc}") from None
    for sig, handler in previous.items():
        if callable(handler):
            signal.signal(sig, handler)
    return True


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
    ) -> None:
        """`shard_workers` > 1: the pool lives in that many ShardWorker actors, split by a
        shard plan for `merge_method` (`max_piece_bytes` caps a piece, else a fair share);
        the evaluation workers then hold only the model. `placement`: see the module doc."""
        import ray

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
        self._started = start_ray(address)
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
                self._placement_group = self._reserve(placement, actors, placement_timeout_s)
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
        import ray

        from recycler.cluster.shard_worker import ShardConfig, ShardWorker
        from recycler.cluster.shards import plan_shards, pool_sizes
        from recycler.pool import Pool

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
                **self._placed(i),
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
    def from_spec(cls, spec: Any, pool: Any, objectives: Sequence[Any]) -> RayEvaluator:
        """From a StudySpec, its opened Pool and its objectives."""
        gpus = float(spec.cluster.gpus_per_worker)
        tasks = tuple(dict.fromkeys(o.task for o in objectives))
        cfg = WorkerConfig(
            checkpoints=tuple(str(c.path.resolve()) for c in pool.checkpoints),
            base=str(pool.base.path.resolve()) if pool.base is not None else None,
            model_dir=str(pool.config_dir.resolve()),
            tasks_dir=str(spec.tasks_dir),
            tasks=tasks,
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
        )

    def _reserve(self, placement: str, n_bundles: int, timeout_s: float) -> Any:
        """A placement group of one bundle per worker, ready, or a RecyclerError."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        bundle = {
            "CPU": self.cpus_per_worker,
            **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {}),
        }
        group = placement_group(
            [dict(bundle) for _ in range(n_bundles)], strategy=placement.upper()
        )
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            raise RecyclerError(
                f"cluster.placement: Ray could not place {n_bundles} worker(s) of {bundle} with strategy "
                f"{placement} within {timeout_s:g} s (the cluster has {have}, nodes: {len(ray.nodes())})"
            )
        return group

    def _placed(self, bundle_index: int) -> dict[str, Any]:
        """Actor options that put a worker in its bundle of the placement group, if there is one."""
        if self._placement_group is None:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self._placement_group, placement_group_bundle_index=bundle_index
            )
        }

    def _spawn(self, bundle_index: int) -> Any:
        cfg = WorkerConfig(**{**self.cfg.__dict__, "threads": self.threads})
        actor = self._remote.options(
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            max_restarts=2,
            max_task_retries=1,
            **self._placed(bundle_index),
        ).remote(cfg)
        self._bundle_of[actor] = bundle_index
        return actor

    def _wait_ready(self, actors: list[Any]) -> list[dict[str, Any]]:
        import ray

        try:
            return list(ray.get([a.ready.remote() for a in actors]))
        except ray.exceptions.RayActorError as exc:
            raise RecyclerError(f"an evaluation worker could not start: {_cause(exc)}") from None

    @property
    def capacity(self) -> int:
        return self.n_workers

    def submit(self, ticket: int, recipe: dict[str, Any], split: str) -> None:
        if not self._idle:
            raise RuntimeError(
                "submit with every worker busy: the caller keeps one trial per worker"
            )
        actor = self._idle.pop()
        if self._shards:
            # Every shard worker merges its pieces; the evaluation worker fetches them (nested
            # refs, so it sees a failed shard as its own error and fetches one shard at a time).
            pieces = [s.merge.remote(recipe) for s in self._shards]
            ref = actor.evaluate_pieces.remote(pieces, split)
        else:
            ref = actor.evaluate.remote(recipe, split)
        self._pending[ref] = (ticket, actor)

    def wait(self) -> list[tuple[int, EvalResult]]:
        import ray

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
        import ray

        if not ray.is_initialized():
            return
        for actor in [*self._idle, *(a for _, a in self._pending.values()), *self._shards]:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(actor)
        self._idle, self._pending, self._shards = [], {}, []
        if self._placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):  # the cluster may be gone already
                remove_placement_group(self._placement_group)
            self._placement_group = None
        if self._started:
            ray.shutdown()
            self._started = False


def _cause(exc: BaseException) -> str:
    """The last meaningful line of a Ray error (its own text wraps the remote traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~", "Traceback")):
            return line[:500]
    return type(exc).__name__
