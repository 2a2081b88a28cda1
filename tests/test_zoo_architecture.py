"""The demo pool of another architecture (`build_zoo(..., architecture="qwen2")`): its files,
read by the libraries real pools come from, and the marker that keeps it apart from a Llama
pool."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CACHE, _zoo_source_hash

from recycler.cli import main
from recycler.errors import RecyclerError
from recycler.zoo import build as zoo_build
from recycler.zoo.tokenizer import encode, vocab


@pytest.fixture(scope="module")
def qwen2_zoo() -> Path:
    """The micro pool built of Qwen2 models, cached like conftest's `micro_zoo` (keyed by the
    zoo's source hash). Its own prefix: `micro_zoo` removes every other `zoo-micro-*`."""
    current = CACHE / f"zoo-qwen2-micro-{_zoo_source_hash()}"
    zoo = zoo_build.build_zoo(current, size="micro", seed=0, architecture="qwen2", quiet=True)
    for stale in CACHE.glob("zoo-qwen2-micro-*"):
        if stale != current:
            shutil.rmtree(stale, ignore_errors=True)
    return zoo


def test_qwen2_pool_is_qwen2_and_its_models_load(qwen2_zoo: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    marker = json.loads((qwen2_zoo / zoo_build.MARKER).read_text())
    assert marker["architecture"] == "qwen2"
    ids = torch.tensor([encode("R:abcd=", vocab())])
    checkpoints = sorted((qwen2_zoo / "checkpoints").iterdir())
    assert len(checkpoints) >= 4
    for d in [qwen2_zoo / "base", *checkpoints]:
        assert json.loads((d / "config.json").read_text())["model_type"] == "qwen2", d.name
        model = AutoModelForCausalLM.from_pretrained(d)
        assert type(model).__name__ == "Qwen2ForCausalLM"
        # Qwen2's q/k/v biases are in the files, not left at their initial zeros by a load
        # that skipped them.
        assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
        assert torch.isfinite(model(ids).logits).all()

    plain = AutoModelForCausalLM.from_pretrained(qwen2_zoo / "base")(ids).logits
    adapters = sorted((qwen2_zoo / "adapters").iterdir())
    assert len(adapters) >= 3
    for d in adapters:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(qwen2_zoo / "base"), d
        )
        assert not torch.allclose(model(ids).logits, plain)

    scores = json.loads((qwen2_zoo / "scores.json").read_text())
    names = {d.name for d in [*checkpoints, *adapters]} | {"base", "uniform_soup"}
    assert set(scores["models"]) == names
    assert (qwen2_zoo / "study.yaml").is_file()


WANT = {"size": "micro", "seed": 0, "version": zoo_build.BUILD_VERSION}


def test_the_marker_keeps_architectures_apart(tmp_path: Path) -> None:
    # A marker without the key is a Llama pool (every pool built before the choice existed).
    (tmp_path / zoo_build.MARKER).write_text(json.dumps(WANT))
    assert zoo_build.prepare(tmp_path, WANT) is True
    assert zoo_build.prepare(tmp_path, {**WANT, "architecture": "llama"}) is True
    with pytest.raises(RecyclerError, match="architecture=llama"):
        zoo_build.prepare(tmp_path, {**WANT, "architecture": "qwen2"})

    (tmp_path / zoo_build.MARKER).write_text(json.dumps({**WANT, "architecture": "qwen2"}))
    assert zoo_build.prepare(tmp_path, {**WANT, "architecture": "qwen2"}) is True
    with pytest.raises(RecyclerError, match="architecture=qwen2"):
        zoo_build.prepare(tmp_path, WANT)


def test_an_unknown_architecture_is_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(RecyclerError, match="architecture must be one of llama, qwen2"):
        zoo_build.build_zoo(tmp_path / "z", size="micro", architecture="gpt2")
    assert not (tmp_path / "z").exists()
    code = main(["zoo", "build", str(tmp_path / "z"), "--architecture", "gpt2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--architecture" in lines[0], lines
    assert not (tmp_path / "z").exists()
