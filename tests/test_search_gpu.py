"""The trial worker on CUDA: the pool resident on the GPU, merged there, scored there. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recycler.cluster.worker import TrialWorker, WorkerConfig
from recycler.config import load_study_spec
from recycler.search.space import SearchSpace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_worker_on_cuda_scores_like_the_cpu(micro_zoo: Path) -> None:
    spec = load_study_spec(micro_zoo / "study.yaml")
    from recycler.pool import Pool

    pool = Pool.open(spec.pool.checkpoints, spec.base_path, root=spec.root)
    space = SearchSpace.from_pool(spec, pool)
    weights = [float(i + 1) for i in range(space.n)]
    params = space.encode([w / sum(weights) for w in weights])
    assert params is not None
    recipe = space.recipe_dict(space.decode(params))

    def worker(device: str) -> TrialWorker:
        return TrialWorker(
            WorkerConfig(
                checkpoints=tuple(str(c.path) for c in pool.checkpoints),
                base=str(pool.base.path) if pool.base is not None else None,
                model_dir=str(pool.config_dir),
                tasks_dir=str(spec.tasks_dir),
                tasks=("zoo_inc", "zoo_rev"),
                limit=None,
                batch_size=64,
                dtype="float32",
                device=device,
            )
        )

    gpu = worker("cuda")
    assert all(t.device.type == "cuda" for vs in gpu.shard.versions.values() for t in vs)
    on_gpu = gpu.evaluate(recipe, "dev")
    on_cpu = worker("cpu").evaluate(recipe, "dev")
    assert on_gpu.ok and on_cpu.ok, (on_gpu.error, on_cpu.error)
    for task in ("zoo_inc", "zoo_rev"):
        # Kernels differ between devices; an answer flips only on a near tie.
        assert on_gpu.metrics[task]["acc"] == pytest.approx(on_cpu.metrics[task]["acc"], abs=0.05)
