"""`slices:` recipes: layer ranges merged and stacked, against mergekit 0.1.5 as the oracle.

A 4-layer Llama-style pool (base + 2 checkpoints, fp32, made by experiments/make_pool.py)
and three recipes adapted from mergekit's examples: `gradient-slerp.yml` (one slice of
two sources, t gradients under filters), `orcamini-platy-44layer.yml` (a passthrough
frankenmerge: 3 + 3 layers of two models, 6 in all) and a slice merge (a linear merge of
two sources' different layer ranges, then one layer of a third source). Each is merged by
`recycler merge` and by mergekit-yaml; the tensors must match within bf16 rounding of
the inputs' magnitude (both in fp32; the frankenmerge in bf16), the configs must give
the new depth and the models must load with transformers and give mergekit's logits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from recycler.cli import main

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_PYTHON = (
    Path(os.environ.get("RECYCLER_MERGEKIT_VENV", ROOT / ".venv-mergekit")) / "bin" / "python"
)
_spec = importlib.util.spec_from_file_location("make_pool", ROOT / "experiments" / "make_pool.py")
assert _spec is not None and _spec.loader is not None
make_pool = importlib.util.module_from_spec(_spec)
sys.modules["make_pool"] = make_pool
_spec.loader.exec_module(make_pool)

MERGEKIT = """
import json, sys
from mergekit.scripts.run_yaml import main
for config, out in json.loads(sys.argv[1]):
    main([config, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
         standalone_mode=False)
"""

# The same, each recipe on its own: {out: error} for those that raise.
MERGEKIT_EACH = """
import json, sys
from mergekit.scripts.run_yaml import main
failed = {}
for config, out in json.loads(sys.argv[1]):
    try:
        main([config, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
             standalone_mode=False)
    except Exception as exc:
        failed[out] = str(exc)
print(json.dumps(failed))
"""


def recipes(base: str, a: str, b: str) -> dict[str, dict[str, Any]]:
    t = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    return {
        "gradient-slerp": {
            "slices": [
                {
                    "sources": [
                        {"model": a, "layer_range": [0, 4]},
                        {"model": b, "layer_range": [0, 4]},
                    ]
                }
            ],
            "merge_method": "slerp",
            "base_model": a,
            "parameters": {"t": t},
            "dtype": "float32",
        },
        "frankenmerge": {
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 3]}]},
                {"sources": [{"model": b, "layer_range": [1, 4]}]},
            ],
            "merge_method": "passthrough",
            "dtype": "bfloat16",
        },
        "slice-merge": {
            "slices": [
                {
                    "sources": [
                        {"model": a, "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.9]}},
                        {"model": b, "layer_range": [2, 4]},
                    ],
                    "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]},
                },
                {"sources": [{"model": base, "layer_range": [3, 4]}]},
            ],
            "merge_method": "linear",
            "parameters": {"weight": 0.5},
            "dtype": "float32",
        },
    }


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("slices")
    shape = make_pool.LlamaShape(
        hidden=32, intermediate=64, layers=4, heads=4, kv_heads=2, vocab=64
    )
    spec = make_pool.PoolSpec(
        shape=shape,
        n_checkpoints=2,
        with_base=True,
        checkpoint_dtypes=("float32", "float32"),
        base_dtype="float32",
        delta_scale=0.5,
        seed=3,
    )
    pool = make_pool.build_pool(root / "pool", spec)
    assert pool.base is not None
    a, b = (str(c) for c in pool.checkpoints)
    out: dict[str, Any] = {"root": root, "inputs": [str(pool.base), a, b], "recipes": {}}
    jobs = []
    for name, recipe in recipes(str(pool.base), a, b).items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out["recipes"][name] = recipe
        assert main(["merge", str(path), str(root / "ours" / name)]) == 0
        jobs.append([str(path), str(root / "mergekit" / name)])
    if MERGEKIT_PYTHON.is_file():
        subprocess.run(
            [str(MERGEKIT_PYTHON), "-c", MERGEKIT, json.dumps(jobs)],
            check=True,
            timeout=300,
            capture_output=True,
        )
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


NAMES = ["gradient-slerp", "frankenmerge", "slice-merge"]


@pytest.mark.parametrize("name", NAMES)
def test_matches_mergekit(merged: dict[str, Any], name: str) -> None:
    if not MERGEKIT_PYTHON.is_file():
        pytest.skip(f"mergekit venv not found at {MERGEKIT_PYTHON}")
    root = merged["root"]
    ours, theirs = _tensors(root / "ours" / name), _tensors(root / "mergekit" / name)
    assert sorted(ours) == sorted(theirs)
    scale = max(float(t.abs().max()) for p in merged["inputs"] for t in _tensors(Path(p)).values())
    for n, want in theirs.items():
        got = ours[n]
        assert got.dtype == want.dtype and got.shape == want.shape, n
        diff = float((got.double() - want.double()).abs().max())
        assert diff <= 2.0**-8 * scale, f"{name}: {n} differs by {diff:.3g}"
    ours_cfg = json.loads((root / "ours" / name / "config.json").read_text())
    their_cfg = json.loads((root / "mergekit" / name / "config.json").read_text())
    assert ours_cfg["num_hidden_layers"] == their_cfg["num_hidden_layers"]


def test_depths_and_logits(merged: dict[str, Any]) -> None:
    root = merged["root"]
    depths = {n: json.loads((root / "ours" / n / "config.json").read_text()) for n in NAMES}
    assert [depths[n]["num_hidden_layers"] for n in NAMES] == [4, 6, 3]
    model = AutoModelForCausalLM.from_pretrained(root / "ours" / "frankenmerge")
    assert len(model.model.layers) == 6
    # layer 3 of the frankenmerge is layer 1 of the second source
    second = _tensors(Path(merged["inputs"][2]))
    ours = _tensors(root / "ours" / "frankenmerge")
    key = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(ours[key.format(3)], second[key.format(1)].to(torch.bfloat16))
    if MERGEKIT_PYTHON.is_file():
        ids = torch.arange(16).unsqueeze(0)
        theirs = AutoModelForCausalLM.from_pretrained(root / "mergekit" / "frankenmerge")
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, theirs(ids).logits, atol=1e-3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r["slices"][1]["sources"][0].update(layer_range=[2, 6]),
            "slices.1.sources.0.layer_range: [2, 6] is beyond the 4 layers of",
        ),
        (
            lambda r: r["slices"][0]["sources"][0].update(layer_range=[3, 1]),
            "slices.0.sources.0.layer_range: must be [FIRST, END] with 0 <= FIRST < END",
        ),
        (
            lambda r: r["slices"][0]["sources"].append(
                {"model": r["slices"][1]["sources"][0]["model"], "layer_range": [0, 3]}
            ),
            "slices.0: models: passthrough takes 1 model, got 2",
        ),
        (
            lambda r: r["slices"][0]["sources"].append(
                {"model": r["slices"][1]["sources"][0]["model"], "layer_range": [0, 1]}
            ),
            "slices.0.sources.1.layer_range: 1 layers, but sources.0 has 3",
        ),
        (
            lambda r: r["slices"][0].update(colour="red"),
            "slices.0.colour: unknown key",
        ),
    ],
)
def test_bad_slices_name_the_key(
    merged: dict[str, Any],
    change: Any,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = json.loads(json.dumps(merged["recipes"]["frankenmerge"]))
    change(recipe)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("recycler: error: ") and message in err, (
        err
    )
    assert not (tmp_path / "out").exists()


def test_stages_run_in_order_and_resume(
    merged: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mergekit's mega.yml shape: a named slices stage, then a merge that names it."""
    first = dict(merged["recipes"]["gradient-slerp"], name="smooth", out_path="stages/smooth")
    b = merged["inputs"][2]
    second = {
        "merge_method": "linear",
        "models": [
            {"model": "smooth", "parameters": {"weight": [0.2, 0.8]}},
            {"model": b, "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    path = tmp_path / "mega.yaml"
    path.write_text(yaml.safe_dump_all([first, second], sort_keys=False))
    out = tmp_path / "final"
    assert main(["merge", str(path), str(out)]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["stage 1/2 smooth", "stage 2/2"], lines
    smooth = _tensors(tmp_path / "stages" / "smooth")
    final, other = _tensors(out), _tensors(Path(b))
    key = "model.layers.{}.mlp.down_proj.weight"
    for layer, w in ((0, 0.2), (3, 0.8)):  # the weight gradient over the 4 layers
        n = key.format(layer)
        want = (w * smooth[n] + 0.5 * other[n]) / (w + 0.5)
        assert torch.allclose(final[n], want, atol=1e-6), n
    assert main(["merge", str(path), str(out)]) == 0
    again = capsys.readouterr().err.strip().splitlines()
    assert all(line.endswith("is complete, not redone") for line in again) and len(again) == 2
    second["models"][1]["parameters"]["weight"] = 0.25  # the last stage changed: not complete
    path.write_text(yaml.safe_dump_all([first, second], sort_keys=False))
    assert main(["merge", str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("stage 1/2 smooth") and "exists and is not empty" in err[-1], err


def test_a_stage_named_twice_is_refused(
    merged: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = dict(merged["recipes"]["frankenmerge"], name="x")
    path = tmp_path / "mega.yaml"
    path.write_text(yaml.safe_dump_all([doc, doc, doc], sort_keys=False))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("document 2: name: must be a new stage name, got 'x'"), err


def _qwen2_pool(root: Path) -> list[str]:
    """A tiny Qwen2 (tied embeddings, q/k/v biases) base and two fine-tunes, fp32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    paths = []
    for seed, name in enumerate(("base", "a", "b")):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():  # visible biases (transformers initialises them to zero)
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
        model.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths


def test_qwen2_slices_and_ties_gradients_match_mergekit(tmp_path: Path) -> None:
    """Tied embeddings stay tied, biases are merged, the stacked config loads (mergekit
    0.1.5's own stacked Qwen2 config keeps the old `layer_types`), and TIES with per-model
    gradients under filters gives mergekit's tensors."""
    base, a, b = _qwen2_pool(tmp_path / "pool")
    stacked = {
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 4]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    ties = {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {
                "model": a,
                "parameters": {
                    "weight": [{"filter": "mlp", "value": [0.2, 1.0]}, {"value": 0.6}],
                    "density": [0.9, 0.5],
                },
            },
            {
                "model": b,
                "parameters": {
                    "weight": 0.4,
                    "density": [{"filter": "self_attn", "value": [0.3, 0.8]}, {"value": 0.7}],
                },
            },
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    jobs = []
    for name, recipe in (("stacked", stacked), ("ties", ties)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        assert main(["merge", str(path), str(tmp_path / "ours" / name)]) == 0
        jobs.append([str(path), str(tmp_path / "mergekit" / name)])
    ours = _tensors(tmp_path / "ours" / "stacked")
    assert "lm_head.weight" not in ours and "model.layers.5.self_attn.q_proj.bias" in ours
    config = json.loads((tmp_path / "ours" / "stacked" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["tie_word_embeddings"] is True
    if "layer_types" in config:
        assert len(config["layer_types"]) == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours" / "stacked")
    assert len(model.model.layers) == 6
    if not MERGEKIT_PYTHON.is_file():
        pytest.skip(f"mergekit venv not found at {MERGEKIT_PYTHON}")
    done = subprocess.run(
        [str(MERGEKIT_PYTHON), "-c", MERGEKIT_EACH, json.dumps(jobs)],
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    # mergekit writes the stacked tensors, then fails on the config it made: 6 layers, 4 types
    assert list(failed) == [jobs[0][1]] and "layer_types" in failed[jobs[0][1]], failed
    scale = max(float(t.abs().max()) for p in (base, a, b) for t in _tensors(Path(p)).values())
    for name in ("stacked", "ties"):
        got, want = _tensors(tmp_path / "ours" / name), _tensors(tmp_path / "mergekit" / name)
        assert sorted(got) == sorted(want), name
        for n in want:
            diff = float((got[n].double() - want[n].double()).abs().max())
            assert diff <= 2.0**-8 * scale, f"{name}: {n} differs by {diff:.3g}"
