"""Pools of real checkpoints written by transformers and peft: reading, LoRA, tied heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_pool import load_state, make_base, make_finetune, make_pool

from recycler.errors import RecyclerError
from recycler.merge.engine import merge_state_dict
from recycler.merge.recipe import ModelSpec, Recipe
from recycler.pool import Pool


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pool(tmp_path_factory.mktemp("pool"))


def test_index_reads_every_layout_and_dtype(pool_dirs: dict[str, Path]) -> None:
    pool = Pool.open([pool_dirs["c0"], pool_dirs["c1"], pool_dirs["c2"]], pool_dirs["base"])
    assert pool.names == ["c0", "c1", "c2"]
    assert pool.n_layers == 2
    for ckpt, dtype in zip(pool.checkpoints, [torch.bfloat16, torch.float32, torch.float16]):
        state = load_state(ckpt.path)
        for name in pool.tensor_names:
            t = ckpt.read(name)
            assert t.dtype == dtype
            assert torch.equal(t, state[name])


def test_glob_expansion_skips_the_base_and_sorts(pool_dirs: dict[str, Path]) -> None:
    root = pool_dirs["base"].parent
    pool = Pool.open(["*"], "base", root=root)
    assert pool.names == ["c0", "c1", "c2"]
    with pytest.raises(RecyclerError, match="matches nothing"):
        Pool.open(["nothing-*"], root=root)


def test_merge_state_dict_mixes_dtypes_in_fp32(pool_dirs: dict[str, Path]) -> None:
    pool = Pool.open([pool_dirs["c0"], pool_dirs["c1"], pool_dirs["c2"]])
    recipe = Recipe(
        "linear",
        [ModelSpec(str(p), weight=w) for p, w in zip(pool.checkpoints, [1.0, 2.0, 1.0])],
        dtype="float32",
    )
    merged = merge_state_dict(pool, recipe)
    states = [load_state(pool_dirs[k]) for k in ("c0", "c1", "c2")]
    for name, tensor in merged.items():
        want = (
            states[0][name].double() + 2 * states[1][name].double() + states[2][name].double()
        ) / 4
        torch.testing.assert_close(tensor.double(), want, rtol=0, atol=1e-6)


def test_tied_head_is_read_from_the_embedding(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", tie=False)
    make_finetune(base, tmp_path / "untied", seed=1, tie=False)
    make_finetune(base, tmp_path / "tied", seed=2, tie=True)
    tied_state = load_state(tmp_path / "tied")
    assert "lm_head.weight" not in tied_state  # transformers omits a tied head
    pool = Pool.open([tmp_path / "untied", tmp_path / "tied"], tmp_path / "base")
    recipe = Recipe(
        "linear", [ModelSpec(str(c.path), weight=0.5) for c in pool.checkpoints], dtype="float32"
    )
    merged = merge_state_dict(pool, recipe)
    untied_state = load_state(tmp_path / "untied")
    want = (
        untied_state["lm_head.weight"].float() + tied_state["model.embed_tokens.weight"].float()
    ) / 2
    torch.testing.assert_close(merged["lm_head.weight"], want)


def test_lora_adapter_reads_as_base_plus_delta(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()
    pool = Pool.open([tmp_path / "adapter"], tmp_path / "base")
    ckpt = pool.checkpoints[0]
    for name in pool.tensor_names:
        torch.testing.assert_close(
            ckpt.read(name).float(), expected[name].float(), rtol=1e-5, atol=1e-6
        )
    with pytest.raises(RecyclerError, match="needs the pool's base"):
        Pool.open([tmp_path / "adapter"])


def test_trainer_state_is_read(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    make_finetune(base, tmp_path / "c", seed=1)
    (tmp_path / "c" / "trainer_state.json").write_text(
        '{"global_step": 120, "log_history": [{"loss": 2.0, "step": 60}, {"loss": 1.5, "step": 120}, {"eval_loss": 9.0}]}'
    )
    state = Pool.open([tmp_path / "c"]).checkpoints[0].trainer_state()
    assert state is not None and state.step == 120 and state.loss == 1.5
