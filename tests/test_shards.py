"""The shards: the shard plan (pure), and merges through 1, 2 and 3 ShardWorker actors
on a real local Ray: the same tensors bit for bit, and the same lm-eval scores.

One Ray cluster serves every Ray test here (RayEvaluator reuses an initialised Ray).
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from recycler.cluster.shards import ShardPlan, TensorSize, plan_shards
from recycler.errors import RecyclerError
from recycler.merge.methods import METHODS
from recycler.merge.recipe import Recipe
from recycler.merge.resident import Piece

if TYPE_CHECKING:
    from recycler.cluster.worker import WorkerConfig

# --- the plan (pure) ---------------------------------------------------------------


def sizes(seed: int = 0, n: int = 40) -> list[TensorSize]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        shape = (rng.choice([1, 4, 64, 256, 1000]), rng.choice([1, 16, 64]))
        out.append(TensorSize(f"t{i}", shape, math.prod(shape) * 2))
    out.append(TensorSize("scalar", (), 4))
    out.append(TensorSize("vector", (7,), 28))
    return out


def shard_bytes(plan: ShardPlan) -> list[int]:
    return [sum(p.nbytes for p in shard) for shard in plan.shards]


def split_tensors(plan: ShardPlan) -> list[str]:
    """The tensors cut into row blocks."""
    return sorted({p.name for shard in plan.shards for p in shard if not p.whole})


def assert_covers(plan: ShardPlan, tensors: list[TensorSize]) -> None:
    """Every tensor's rows are covered exactly once, and a whole piece is the whole tensor."""
    by_name: dict[str, list[Piece]] = {}
    for shard in plan.shards:
        for p in shard:
            by_name.setdefault(p.name, []).append(p)
    assert set(by_name) == {t.name for t in tensors}
    for t in tensors:
        pieces = sorted(by_name[t.name], key=lambda p: p.start)
        rows = t.shape[0] if t.shape else 0
        if len(pieces) == 1 and pieces[0].whole:
            assert (pieces[0].start, pieces[0].stop, pieces[0].nbytes) == (0, rows, t.nbytes)
            continue
        assert all(not p.whole and p.rows > 0 for p in pieces)
        assert pieces[0].start == 0 and pieces[-1].stop == rows
        assert all(a.stop == b.start for a, b in itertools.pairwise(pieces))
        assert sum(p.nbytes for p in pieces) == t.nbytes


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5])
@pytest.mark.parametrize("method", ["linear", "dare_linear", "ties", "dare_ties"])
def test_plan_covers_balances_and_is_deterministic(n_shards: int, method: str) -> None:
    tensors = sizes()
    plan = plan_shards(tensors, n_shards, method=method)
    assert plan.n_shards == n_shards
    assert_covers(plan, tensors)
    assert plan == plan_shards(list(tensors), n_shards, method=method)
    loads = shard_bytes(plan)
    assert sum(loads) == sum(t.nbytes for t in tensors)
    biggest = max(p.nbytes for shard in plan.shards for p in shard)
    # Greedy largest-first into the lightest bin: no bin exceeds another by more than one piece.
    assert max(loads) - min(loads) <= biggest
    if not METHODS[method].row_splittable or n_shards == 1:
        assert split_tensors(plan) == []
    if n_shards == 1:
        assert [p.name for p in plan.shards[0]] == [t.name for t in tensors]  # pool order


def test_plan_splits_big_tensors_by_rows_only_where_the_method_allows() -> None:
    tensors = [
        TensorSize("big", (1000, 10), 40_000),
        *(TensorSize(f"s{i}", (10, 10), 400) for i in range(5)),
    ]
    plan = plan_shards(tensors, 3, method="linear")
    assert split_tensors(plan) == ["big"]
    assert_covers(plan, tensors)
    loads = shard_bytes(plan)
    assert max(loads) - min(loads) <= 400 + 40  # balanced to within a small piece (and a row)
    ties = plan_shards(tensors, 3, method="ties")
    assert split_tensors(ties) == []
    assert_covers(ties, tensors)
    # A forced small piece size cuts everything above it, never below one row.
    small = plan_shards(tensors, 2, method="dare_linear", max_piece_bytes=100)
    assert set(split_tensors(small)) == {t.name for t in tensors}
    assert_covers(small, tensors)
    assert all(p.rows >= 1 for shard in small.shards for p in shard)
    with pytest.raises(ValueError):
        plan_shards(tensors, 0, method="linear")


def test_plan_ties_break_by_pool_order() -> None:
    tensors = [TensorSize(f"t{i}", (4, 4), 64) for i in range(6)]
    plan = plan_shards(tensors, 3, method="linear")
    assert [[p.name for p in s] for s in plan.shards] == [["t0", "t3"], ["t1", "t4"], ["t2", "t5"]]


# --- merges on a real local Ray -----------------------------------------------------


def recipe_dict(zoo: Path, method: str, dtype: str) -> dict[str, Any]:
    ckpts = sorted((zoo / "checkpoints").iterdir())
    weights = [0.1, 0.4, 0.3, 0.2][: len(ckpts)]
    params: dict[str, Any] = {"weight": 0.0}
    models = []
    for path, w in zip(ckpts, weights):
        params = {"weight": w}
        if method.startswith("dare"):
            params["density"] = 0.6
        models.append({"model": str(path), "parameters": params})
    out: dict[str, Any] = {
        "merge_method": method,
        "models": models,
        "dtype": dtype,
        "random_seed": 7,
    }
    if method != "linear":
        out["base_model"] = str(zoo / "base")
        out["parameters"] = {"lambda": 0.9}
    return out


RECIPES = [("linear", "bfloat16"), ("dare_linear", "float32")]


def micro_worker_config(zoo: Path, tasks: tuple[str, ...] = ("zoo_inc",)) -> WorkerConfig:
    """A WorkerConfig over the micro zoo's checkpoints, scoring `tasks` on 24 examples."""
    from recycler.cluster.worker import WorkerConfig
    from recycler.evaluate.tasks import folder_request

    ckpts = tuple(str(p) for p in sorted((zoo / "checkpoints").iterdir()))
    return WorkerConfig(
        checkpoints=ckpts,
        base=str(zoo / "base"),
        model_dir=str(zoo / "base"),
        suite=folder_request(zoo / "tasks", list(tasks)),
        limit=24,
        batch_size=64,
        dtype="bfloat16",
    )


def test_sharded_merge_is_bit_for_bit(micro_zoo: Path, ray_cluster: None) -> None:
    import ray

    from recycler.cluster.pieces import MergedPiece
    from recycler.cluster.shard_worker import ShardConfig, ShardWorker
    from recycler.cluster.shards import pool_sizes
    from recycler.merge.engine import merge_state_dict
    from recycler.pool import Pool

    ckpts = tuple(str(p) for p in sorted((micro_zoo / "checkpoints").iterdir()))
    base = str(micro_zoo / "base")
    pool = Pool.open(list(ckpts), base)
    tensors = pool_sizes(pool)
    recipes = [recipe_dict(micro_zoo, m, d) for m, d in RECIPES]
    reference = [merge_state_dict(pool, Recipe.from_dict(r)) for r in recipes]
    remote = ray.remote(ShardWorker)
    small = max(t.nbytes for t in tensors) // 5  # forces row blocks of the big tensors
    for n_shards in (1, 2, 3):
        plan = plan_shards(
            tensors, n_shards, method="dare_linear", max_piece_bytes=small if n_shards > 1 else None
        )
        if n_shards > 1:
            assert split_tensors(plan)
        actors = [
            remote.options(num_cpus=0.1).remote(ShardConfig(ckpts, base, pieces, threads=1))
            for pieces in plan.shards
        ]
        try:
            for recipe, ref in zip(recipes, reference):
                typed = Recipe.from_dict(recipe)
                results: list[list[MergedPiece]] = ray.get([a.merge.remote(typed) for a in actors])
                got: dict[str, torch.Tensor] = {}
                for piece in (p for shard in results for p in shard):
                    value = piece.tensor()
                    if piece.whole:
                        assert piece.name not in got
                        got[piece.name] = value.clone()
                    else:
                        full = got.setdefault(
                            piece.name,
                            torch.full(ref[piece.name].shape, float("nan"), dtype=value.dtype),
                        )
                        full[piece.start : piece.start + value.shape[0]] = value
                assert set(got) == set(ref), n_shards
                for name, expect in ref.items():
                    assert got[name].dtype == expect.dtype, name
                    assert torch.equal(
                        got[name].view(torch.uint8), expect.contiguous().view(torch.uint8)
                    ), (
                        n_shards,
                        recipe["merge_method"],
                        name,
                    )
        finally:
            for a in actors:
                ray.kill(a)


def test_row_split_plan_refuses_ties(micro_zoo: Path) -> None:
    from recycler.cluster.shard_worker import ShardConfig, ShardWorker
    from recycler.cluster.shards import pool_sizes
    from recycler.pool import Pool

    ckpts = tuple(str(p) for p in sorted((micro_zoo / "checkpoints").iterdir()))
    pool = Pool.open(list(ckpts), micro_zoo / "base")
    plan = plan_shards(pool_sizes(pool), 2, method="linear", max_piece_bytes=1000)
    worker = ShardWorker(ShardConfig(ckpts, str(micro_zoo / "base"), plan.shards[0]))
    recipe = recipe_dict(micro_zoo, "task_arithmetic", "float32")
    recipe["merge_method"] = "ties"
    with pytest.raises(RecyclerError, match="needs whole tensors"):
        worker.merge(Recipe.from_dict(recipe))


def test_sharded_scores_equal(micro_zoo: Path, ray_cluster: None) -> None:
    from recycler.cluster.evaluator import RayEvaluator

    cfg = micro_worker_config(micro_zoo, tasks=("zoo_inc", "zoo_rev"))
    recipes = [recipe_dict(micro_zoo, m, "bfloat16") for m, _ in RECIPES]
    scores: dict[int, list[dict[str, dict[str, float]]]] = {}
    for n_shards in (1, 2, 3):
        ev = RayEvaluator(
            cfg,
            address=None,
            n_workers=1,
            gpus_per_worker=0,
            shard_workers=n_shards,
            merge_method="dare_linear",
            max_piece_bytes=20_000,
        )
        try:
            if n_shards > 1:
                assert split_tensors(ev.plan) and len(ev.shard_infos) == n_shards
                assert (
                    ev.infos[0]["resident_bytes"] == 0
                )  # the evaluation worker holds only the model
            got = []
            for i, recipe in enumerate(recipes):
                ev.submit(i, recipe, "dev")
                [(ticket, result)] = ev.wait()
                assert ticket == i and result.ok, result.error
                got.append(result.metrics)
            scores[n_shards] = got
        finally:
            ev.close()
    assert scores[1] == scores[2] == scores[3]
    assert all(set(m) == {"zoo_inc", "zoo_rev"} for m in scores[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["linear", "dare_linear"])
def test_shards_resident_on_cuda_merge_as_the_whole_tensor_does(
    micro_zoo: Path, method: str
) -> None:
    """gpus_per_worker > 0: the pieces live on the GPU; row blocks merge as the whole tensor does
    there."""
    from recycler.cluster.shard_worker import ShardConfig, ShardWorker
    from recycler.cluster.shards import pool_sizes
    from recycler.merge.engine import merge_state_dict
    from recycler.pool import Pool

    ckpts = tuple(str(p) for p in sorted((micro_zoo / "checkpoints").iterdir()))
    base = str(micro_zoo / "base")
    pool = Pool.open(list(ckpts), base)
    recipe = recipe_dict(micro_zoo, method, "float32")
    ref = merge_state_dict(pool, Recipe.from_dict(recipe), device="cuda")
    tensors = pool_sizes(pool)
    plan = plan_shards(
        tensors, 3, method=method, max_piece_bytes=max(t.nbytes for t in tensors) // 5
    )
    assert split_tensors(plan)
    for pieces in plan.shards:
        worker = ShardWorker(ShardConfig(ckpts, base, pieces, device="cuda"))
        assert all(t.device.type == "cuda" for vs in worker.resident.versions.values() for t in vs)
        for piece in worker.merge(Recipe.from_dict(recipe)):
            got = piece.tensor()
            expect = ref[piece.name][piece.start : piece.start + got.shape[0]].cpu()
            assert torch.equal(got, expect), piece.name


@pytest.mark.parametrize("victim", ["evaluation", "shard"])
def test_a_killed_worker_is_restarted_and_its_trial_retried(
    victim: str, micro_zoo: Path, ray_cluster: None
) -> None:
    import os
    import signal

    import ray

    from recycler.cluster.evaluator import RayEvaluator

    cfg = micro_worker_config(micro_zoo)
    ev = RayEvaluator(
        cfg, address=None, n_workers=1, gpus_per_worker=0, shard_workers=2, merge_method="linear"
    )
    try:
        recipe = recipe_dict(micro_zoo, "linear", "bfloat16")
        ev.submit(0, recipe, "dev")
        [(_, before)] = ev.wait()
        assert before.ok, before.error
        pid = ev.infos[0]["pid"] if victim == "evaluation" else ev.shard_infos[0]["pid"]
        ev.submit(1, recipe, "dev")
        os.kill(pid, signal.SIGKILL)  # while it serves trial 1
        [(ticket, after)] = ev.wait()
        # Restarted, its part reloaded, the trial retried: the same scores as before.
        assert ticket == 1 and after.ok, after.error
        assert after.metrics == before.metrics
        actor = ev._idle[0] if victim == "evaluation" else ev._shards[0]
        assert ray.get(actor.ready.remote())["pid"] != pid
        ev.submit(2, recipe, "dev")
        [(_, again)] = ev.wait()
        assert again.ok and again.metrics == before.metrics
    finally:
        ev.close()


def test_placement_group_holds_every_worker_and_is_released(
    micro_zoo: Path, ray_cluster: None
) -> None:
    import ray
    from ray.util.placement_group import placement_group_table

    from recycler.cluster.evaluator import RayEvaluator

    cfg = micro_worker_config(micro_zoo)
    ev = RayEvaluator(
        cfg, address=None, n_workers=1, gpus_per_worker=0, shard_workers=2, placement="strict_pack"
    )
    try:
        group = ev._placement_group
        facts = [*ev.shard_infos, *ev.infos]
        # Every worker (2 shard + 1 evaluation) runs in its own bundle of the one group.
        assert {f["placement_group"] for f in facts} == {group.id.hex()}
        assert len({f["node_id"] for f in facts}) == 1
        table = placement_group_table(group)
        assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == 3
        ev.submit(0, recipe_dict(micro_zoo, "linear", "bfloat16"), "dev")
        [(_, result)] = ev.wait()
        assert result.ok, result.error
    finally:
        ev.close()
    assert placement_group_table(group)["state"] == "REMOVED"
    assert ray.is_initialized()  # the test's cluster is left running

    # Two workers on two different nodes cannot be placed on this one-node cluster.
    with pytest.raises(
        RecyclerError, match=r"cluster.placement: Ray could not place 2 worker\(s\).*strict_spread"
    ):
        RayEvaluator(
            cfg,
            address=None,
            n_workers=2,
            gpus_per_worker=0,
            placement="strict_spread",
            placement_timeout_s=2,
        )
    assert all(t["state"] == "REMOVED" for t in placement_group_table().values())


@pytest.mark.parametrize("method", ["ram", "nearswap", "della", "model_stock", "sce"])
def test_shard_pieces_merge_the_other_methods_as_the_engine_does(
    micro_zoo: Path, method: str
) -> None:
    """Each method through a shard plan's resident pieces (what a shard worker holds): split
    by rows exactly where its description allows, and the same bits as the whole-pool merge."""
    from recycler.cluster.shards import pool_sizes
    from recycler.merge.engine import merge_state_dict
    from recycler.merge.resident import ResidentPieces
    from recycler.pool import Pool

    ckpts = [str(p) for p in sorted((micro_zoo / "checkpoints").iterdir())]
    if method == "nearswap":
        ckpts = ckpts[:1]
    base = str(micro_zoo / "base")
    pool = Pool.open(ckpts, base)
    tensors = pool_sizes(pool)
    plan = plan_shards(
        tensors, 2, method=method, max_piece_bytes=max(t.nbytes for t in tensors) // 5
    )
    assert bool(split_tensors(plan)) == METHODS[method].row_splittable
    params = {"nearswap": {"t": 0.001}, "sce": {"select_topk": 0.5}}.get(method, {})
    models = [
        {"model": c, "parameters": {"weight": 0.5, "density": 0.6}}
        if method == "della"
        else {"model": c}
        for c in ckpts
    ]
    recipe = Recipe.from_dict(
        {
            "merge_method": method,
            "base_model": base,
            "models": models,
            "dtype": "float32",
            "random_seed": 3,
            **({"parameters": params} if params else {}),
        }
    )
    reference = merge_state_dict(pool, recipe)
    got: dict[str, torch.Tensor] = {}
    for pieces in plan.shards:
        for piece, value in ResidentPieces(pool, pieces).merge(recipe):
            full = got.setdefault(piece.name, torch.full(reference[piece.name].shape, float("nan")))
            full[piece.start : piece.start + value.shape[0]] = value
    assert set(got) == set(reference)
    for name, expect in reference.items():
        assert torch.equal(got[name], expect), (method, name)
