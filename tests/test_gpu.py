"""The GPU merge path: the same tensors on CUDA as on the CPU. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tiny_pool import load_state, make_pool

from recycler.cli import main
from recycler.merge.engine import merge_state_dict
from recycler.merge.recipe import ModelSpec, Recipe
from recycler.pool import Pool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pool(tmp_path_factory.mktemp("gpu-pool"))


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
)
def test_cuda_merge_matches_cpu(method: str, pool_dirs: dict[str, Path]) -> None:
    pool = Pool.open([pool_dirs["c0"], pool_dirs["c1"], pool_dirs["c2"]], pool_dirs["base"])
    specs = [
        ModelSpec(str(c.path), weight=w, density=d)
        for c, w, d in zip(pool.checkpoints, [0.5, 0.3, 0.2], [0.5, 0.7, 0.9])
    ]
    recipe = Recipe(method, specs, base_model=str(pool_dirs["base"]), dtype="float32")
    cpu = merge_state_dict(pool, recipe, "cpu")
    gpu = merge_state_dict(pool, recipe, "cuda")
    for name, tensor in cpu.items():
        assert gpu[name].device.type == "cuda"
        torch.testing.assert_close(gpu[name].cpu(), tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_cli_merges_on_cuda(pool_dirs: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(pool_dirs["base"]),
                "models": [
                    {"model": str(pool_dirs[c]), "parameters": {"weight": 1.0, "density": 0.5}}
                    for c in ("c0", "c1", "c2")
                ],
                "dtype": "bfloat16",
            }
        )
    )
    assert main(["merge", str(recipe), str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    assert main(["merge", str(recipe), str(tmp_path / "cpu")]) == 0
    a, b = load_state(tmp_path / "gpu"), load_state(tmp_path / "cpu")
    for name in a:
        diff = (a[name].float() - b[name].float()).abs().max().item()
        assert diff <= b[name].float().abs().max().item() * 2**-7, name
