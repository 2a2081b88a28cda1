"""`recycler merge`: the output directory, and one clear line (exit 2) for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from tiny_pool import load_state, make_base, make_finetune, make_pool
from transformers import AutoModelForCausalLM, AutoTokenizer

from recycler.cli import main
from recycler.merge.methods import METHODS


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template")
    make_pool(root)
    return root


@pytest.fixture
def pool(template: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, so a test may damage it."""
    root = tmp_path / "pool"
    shutil.copytree(template, root)
    return root


# Model entries written relative to the pool root by `write_recipe`.
ONE_MODEL = [{"model": "c0"}]


def write_recipe(root: Path, **overrides: object) -> Path:
    recipe: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / "c0"), "parameters": {"weight": 0.5, "density": 0.6}},
            {"model": str(root / "c1"), "parameters": {"weight": 0.3, "density": 0.6}},
            {"model": str(root / "c2"), "parameters": {"weight": 0.2, "density": 0.6}},
        ],
        "parameters": {"normalize": True, "lambda": 1.0},
        "dtype": "bfloat16",
    }
    recipe.update(overrides)
    if overrides.get("models") is ONE_MODEL:
        recipe["models"] = [{"model": str(root / "c0")}]
    method = METHODS.get(str(recipe["merge_method"]))
    if method is not None:
        # the default models' and parameters' entries that another method does not take
        takes = set(method.param_names)
        if "parameters" not in overrides:
            recipe["parameters"] = {k: v for k, v in recipe["parameters"].items() if k in takes}
        if "models" not in overrides:
            recipe["models"] = [
                {**m, "parameters": {k: v for k, v in m["parameters"].items() if k in takes}}
                for m in recipe["models"]
            ]
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_merge(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["merge", *args])
    return code, capsys.readouterr().err


def assert_clean_error(code: int, err: str, out_dir: Path, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recycler: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}*")), "temporary output left behind"


def test_merge_writes_a_loadable_hf_dir(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, err = run_merge(capsys, str(write_recipe(pool)), str(out), "--max-shard-size", "40KB")
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "recipe.yaml",
        "README.md",
        "tokenizer.json",
        "generation_config.json",
    } <= names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    AutoTokenizer.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert (
        "| c1 | 0.3 | 0.6 |" in card
        and len([ln for ln in card.splitlines() if "sha256" in ln or "`" in ln]) > 4
    )
    # The written recipe reproduces the same tensors.
    again = tmp_path / "again"
    assert main(["merge", str(out / "recipe.yaml"), str(again)]) == 0
    a, b = load_state(out), load_state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_is_refused_unless_forced(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_merge(capsys, str(write_recipe(pool)), str(out))
    assert code == 2 and "not empty" in err and (out / "keep.txt").exists()
    code, err = run_merge(capsys, str(write_recipe(pool)), str(out), "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def _damage_truncate(root: Path) -> str:
    f = root / "c0" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return "truncated"


def _damage_header(root: Path) -> str:
    f = root / "c2" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"{not json!!!"
    f.write_bytes(bytes(data))
    return "corrupt safetensors header"


def _damage_header_length(root: Path) -> str:
    f = root / "c2" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = (10**12).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    return "corrupt safetensors header"


def _damage_missing_tensor(root: Path) -> str:
    state = load_state(root / "c0")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(root / "c0" / "model.safetensors"), metadata={"format": "pt"})
    return "model.layers.1.mlp.up_proj.weight: missing"


def _damage_vocab(root: Path) -> str:
    state = load_state(root / "c2")
    state["model.embed_tokens.weight"] = torch.zeros(60, 32, dtype=torch.float16)
    save_file(state, str(root / "c2" / "model.safetensors"), metadata={"format": "pt"})
    return "vocabulary size differs"


def _damage_missing_shard(root: Path) -> str:
    (root / "c1" / "model-00002-of-00004.safetensors").unlink()
    return "does not exist"


def _damage_escaping_index(root: Path) -> str:
    index_path = root / "c1" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../c0/model.safetensors"
    index_path.write_text(json.dumps(index))
    return "outside the checkpoint directory"


def _damage_nan(root: Path) -> str:
    state = load_state(root / "c2")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(root / "c2" / "model.safetensors"), metadata={"format": "pt"})
    return "model.norm.weight: has non-finite values"


def _damage_pickle(root: Path) -> str:
    state = load_state(root / "c0")
    (root / "c0" / "model.safetensors").unlink()
    torch.save(state, root / "c0" / "pytorch_model.bin")
    return "--allow-pickle"


def _damage_missing_checkpoint(root: Path) -> str:
    shutil.rmtree(root / "c2")
    return "c2: no such file or directory"


@pytest.mark.parametrize(
    "damage",
    [
        _damage_truncate,
        _damage_header,
        _damage_header_length,
        _damage_missing_tensor,
        _damage_vocab,
        _damage_missing_shard,
        _damage_escaping_index,
        _damage_nan,
        _damage_pickle,
        _damage_missing_checkpoint,
    ],
)
# ties merges tensors in memory; linear goes file to file through the C kernel.
@pytest.mark.parametrize("method", ["ties", "linear"])
def test_bad_pool_fails_cleanly(
    damage: Callable[[Path], str],
    method: str,
    pool: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fragment = damage(pool)
    out = tmp_path / "out"
    code, err = run_merge(capsys, str(write_recipe(pool, merge_method=method)), str(out))
    assert_clean_error(code, err, out, fragment)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"merge_method": "soup"}, "merge_method: unknown method 'soup'"),
        ({"base_model": None}, "base_model: ties needs a base model"),
        ({"models": []}, "models: must be a non-empty list"),
        ({"dtype": "float8"}, "dtype: unknown dtype 'float8'"),
        ({"parameters": {"normalize": True, "lambda": "big"}}, "parameters.lambda: not a number"),
        ({"parameters": {"temperature": 1.0}}, "parameters.temperature: unknown parameter"),
        ({"slices": []}, "models: give either models or slices, not both"),
        ({"colour": "red"}, "colour: unknown key"),
        ({"tokenizer_source": "union"}, "tokenizer_source: union is not built"),
        ({"tokenizer": {"source": "base", "tokens": {"<x>": {}}}}, "tokenizer.tokens: not built"),
        ({"chat_template": "chatml"}, "chat_template: 'chatml': named templates are not built"),
        # the new methods' contracts and parameters, from their descriptions
        (
            {"merge_method": "slerp", "parameters": {}, "models": ONE_MODEL},
            "parameters.t: required by slerp",
        ),
        (
            {"merge_method": "slerp", "parameters": {"t": 0.5}},
            "models: slerp takes 1 model beside the base, got 3",
        ),
        (
            {"merge_method": "model_stock", "parameters": {}, "models": ONE_MODEL},
            "models: model_stock takes at least 2 models, got 1",
        ),
        (
            {"merge_method": "sce", "parameters": {"select_topk": 1.5}},
            "parameters.select_topk: must be in (0, 1], got 1.5",
        ),
        (
            {"merge_method": "sce", "parameters": {"select_topk": 0}},
            "parameters.select_topk: must be in (0, 1], got 0",
        ),
        (
            {"merge_method": "della", "parameters": {"epsilon": 0.5}},
            "models[0].parameters.epsilon: density 0.6 ± epsilon 0.5 must lie in (0, 1)",
        ),
        (
            {"merge_method": "nearswap", "parameters": {"t": -1.0}, "models": ONE_MODEL},
            "parameters.t: must be in [0, inf), got -1",
        ),
        (
            {"merge_method": "karcher", "parameters": {"max_iter": 2.5}},
            "parameters.max_iter: must be an integer, got 2.5",
        ),
        (
            {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": 1}},
            "parameters.nuslerp_flatten: must be true or false",
        ),
        (
            {"merge_method": "passthrough", "parameters": {}},
            "models: passthrough takes 1 model, got 3",
        ),
        (
            {"merge_method": "ties", "parameters": {"t": 0.5}},
            "parameters.t: unknown parameter for ties",
        ),
    ],
)
def test_bad_recipe_fails_cleanly(
    overrides: dict[str, object],
    fragment: str,
    pool: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    code, err = run_merge(capsys, str(write_recipe(pool, **overrides)), str(out))
    assert_clean_error(code, err, out, fragment)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"weight": 0.5, "density": 0.0}, "models[0].parameters.density: must be in (0, 1]"),
        ({"weight": 0.5, "density": 1.5}, "models[0].parameters.density: must be in (0, 1]"),
        ({"weight": "heavy"}, "models[0].parameters.weight: not a number: 'heavy'"),
        ({"weight": 0.5, "sparsity": 0.1}, "models[0].parameters.sparsity: unknown parameter"),
    ],
)
def test_bad_model_parameters_fail_cleanly(
    params: dict[str, object],
    fragment: str,
    pool: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    models = [{"model": str(pool / "c0"), "parameters": params}, {"model": str(pool / "c1")}]
    out = tmp_path / "out"
    code, err = run_merge(capsys, str(write_recipe(pool, models=models)), str(out))
    assert_clean_error(code, err, out, fragment)


def test_zero_weights_with_normalize(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [{"model": str(pool / c), "parameters": {"weight": 0.0}} for c in ("c0", "c1")]
    out = tmp_path / "out"
    code, err = run_merge(
        capsys, str(write_recipe(pool, merge_method="linear", models=models)), str(out)
    )
    assert_clean_error(code, err, out, "sum to zero")


def test_yaml_syntax_error(pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = pool / "broken.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: [unclosed\n")
    out = tmp_path / "out"
    code, err = run_merge(capsys, str(recipe), str(out))
    assert_clean_error(code, err, out, "YAML syntax error at line")


def test_allowed_pickle_merges_as_its_safetensors_do(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from_safetensors, from_pickle = tmp_path / "safetensors", tmp_path / "pickle"
    code, err = run_merge(capsys, str(write_recipe(pool)), str(from_safetensors))
    assert code == 0, err
    _damage_pickle(pool)
    code, err = run_merge(capsys, str(write_recipe(pool)), str(from_pickle), "--allow-pickle")
    assert code == 0, err
    a, b = load_state(from_safetensors), load_state(from_pickle)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _MakesDirWhenLoaded:
    """What a malicious checkpoint holds: an object whose unpickling runs code (here:
    creates `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_pickle_that_runs_code_is_refused_and_never_run(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "the-pickle-ran"
    checkpoint = pool / "c0" / "pytorch_model.bin"
    state: dict[str, object] = dict(load_state(pool / "c0"))
    state["payload"] = _MakesDirWhenLoaded(marker)
    (pool / "c0" / "model.safetensors").unlink()
    torch.save(state, checkpoint)
    refusals = {(): "pickled checkpoints can run code", ("--allow-pickle",): "weights-only"}
    for flags, fragment in refusals.items():
        out = tmp_path / f"out{len(flags)}"
        code, err = run_merge(capsys, str(write_recipe(pool)), str(out), *flags)
        assert_clean_error(code, err, out, str(checkpoint.parent.name), fragment)
        assert not marker.exists()
    # The payload is live: an unrestricted load runs it.
    torch.load(checkpoint, weights_only=False)
    assert marker.is_dir()


def test_real_process_error_has_no_traceback(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recycler.cli",
            "merge",
            str(write_recipe(pool, merge_method="soup")),
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    )
    assert not out.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_merge_leaves_no_output_dir(sig: signal.Signals, tmp_path: Path) -> None:
    # Large enough to take a few seconds: 3 checkpoints of ~24M params.
    root = tmp_path / "big"
    torch.manual_seed(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        save_file(
            {f"w{i}": torch.randn(1500, 4000) for i in range(4)},
            str(root / name / "model.safetensors"),
        )
        (root / name / "config.json").write_text("{}")  # a merge that would succeed
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": str(root / n)} for n in "abc"],
                "dtype": "float32",
            }
        )
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "recycler.cli", "merge", str(recipe), str(out)],
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while (
        not list(tmp_path.glob(".out.recycler-tmp-*"))
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.01)
    assert proc.poll() is None, "merge finished before it could be killed"
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert not list(tmp_path.glob(".out*")), "SIGTERM should remove the temporary dir"
        assert proc.returncode != 0


def test_base_and_first_checkpoint_may_differ_in_dtype(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = make_base(tmp_path / "base")
    make_finetune(base, tmp_path / "a", seed=1, dtype=torch.float16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": "base",
                "models": [{"model": "a", "parameters": {"weight": 1.0}}],
                "dtype": "float32",
            }
        )
    )
    # Relative paths are found beside the recipe.
    code, err = run_merge(capsys, str(recipe), str(tmp_path / "out"))
    assert code == 0, err
    merged, a = load_state(tmp_path / "out"), load_state(tmp_path / "a")
    for name, t in merged.items():
        torch.testing.assert_close(t, a[name].float(), rtol=0, atol=1e-6)


def test_tokenizer_from_a_model_with_a_chat_template(
    pool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    recipe = write_recipe(pool, tokenizer={"source": str(pool / "base")}, chat_template=template)
    out = tmp_path / "out"
    code, err = run_merge(capsys, str(recipe), str(out))
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == template
    text = tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False)
    assert text == "<s>ab</s>"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["chat_template"] == template
