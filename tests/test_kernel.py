"""The C kernel (`_fused.c`): PyTorch's rounding, a float64 reference, the same bits
however the work is split, the PyTorch fallback, and file-to-file merges of real
safetensors files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_pool import load_state, make_pool
from transformers import AutoModelForCausalLM

from recycler.merge import kernel
from recycler.merge.engine import FileMerger, merge_state_dict
from recycler.merge.kernel import NonFiniteError, combine_files, linear_combination
from recycler.merge.recipe import ModelSpec, Recipe
from recycler.pool import Pool
from recycler.pool.safetensors_file import SafetensorsFile, code_of

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# Half a unit in the last place of each output dtype, relative to the value (at most).
HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Inputs of mixed dtypes: four bf16 in a row, a pair, and singles of every dtype.
MIX = [
    torch.bfloat16,
    torch.bfloat16,
    torch.bfloat16,
    torch.bfloat16,
    torch.float32,
    torch.bfloat16,
    torch.bfloat16,
    torch.float16,
    torch.bfloat16,
]


def _random(
    n: int, dtypes: list[torch.dtype], seed: int = 0
) -> tuple[list[torch.Tensor], list[float]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g).to(d) for d in dtypes]
    coeffs = (torch.rand(len(dtypes), generator=g) * 2 - 0.5).tolist()
    return xs, coeffs


def _without_c_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "_FUSED_CODES", {})


def test_the_c_kernel_is_built() -> None:
    # setup.py builds it optionally; without it merges fall back to PyTorch, several times slower.
    assert kernel.fused_dtypes([code_of(d) for d in FLOATS]), (
        "recycler/merge/_fused.c was not compiled (is a C compiler installed?)"
    )


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_one_fp32_input_rounds_exactly_as_pytorch_casts(out_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g) * torch.logspace(-30, 4, 50_000).float()
    # Halfway cases (ties go to even), subnormals of the output dtype, signed zeros.
    bits = x.view(torch.int32)
    bits[:1000] = (bits[:1000] & ~0xFFFF) | 0x8000
    x[1000:1100] = torch.linspace(-1e-6, 1e-6, 100)
    x[1100], x[1101] = 0.0, -0.0
    got = linear_combination([x], [1.0], out_dtype)
    assert torch.equal(got.view(torch.int16), x.to(out_dtype).view(torch.int16))


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_matches_a_float64_reference_for_mixed_dtypes(
    out_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "TASK", 4096)  # several ranges, and a ragged last one
    xs, coeffs = _random(3 * 4096 + 1023, MIX)
    got = linear_combination(xs, coeffs, out_dtype)
    terms = [c * x.double() for c, x in zip(coeffs, xs)]
    exact = sum(terms)
    assert isinstance(exact, torch.Tensor)
    # One rounding to the output dtype, plus fp32 accumulation error.
    # (2**-24 absolute: fp16's subnormals near zero.)
    tolerance = (
        exact.abs() * HALF_ULP[out_dtype] + sum(t.abs() for t in terms) * 2.0**-21 + 2.0**-24
    )
    assert bool(((got.double() - exact).abs() <= tolerance).all())


def test_same_bits_however_the_work_is_split(monkeypatch: pytest.MonkeyPatch) -> None:
    xs, coeffs = _random(100_003, MIX, seed=1)
    whole = linear_combination(xs, coeffs, torch.bfloat16)
    monkeypatch.setattr(kernel, "TASK", 3 * 1024 + 5)
    assert torch.equal(linear_combination(xs, coeffs, torch.bfloat16), whole)


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_the_pytorch_fallback_agrees(
    out_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    xs, coeffs = _random(70_001, MIX, seed=2)
    fused = linear_combination(xs, coeffs, out_dtype)
    _without_c_kernel(monkeypatch)
    monkeypatch.setattr(kernel, "TASK", 20_000)
    fallback = linear_combination(xs, coeffs, out_dtype)
    # Both round once from fp32 sums that may differ in their last bits.
    scale = sum(abs(c) * x.double().abs() for c, x in zip(coeffs, xs))
    assert isinstance(scale, torch.Tensor)
    assert bool(
        (
            (fused.double() - fallback.double()).abs()
            <= fallback.double().abs() * 2 * HALF_ULP[out_dtype] + scale * 2.0**-20 + 2.0**-24
        ).all()
    )


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    ("values", "out_dtype"),
    [
        ([1.0, float("nan")], torch.bfloat16),
        ([float("inf"), 1.0], torch.float32),
        ([60000.0, 60000.0], torch.float16),  # finite inputs, the sum overflows fp16
        ([3e38, 3e38], torch.bfloat16),  # overflows fp32 itself
    ],
)
def test_non_finite_results_are_caught(
    values: list[float], out_dtype: torch.dtype, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fused:
        _without_c_kernel(monkeypatch)
    xs = [torch.ones(10_000) for _ in values]
    for x, v in zip(xs, values):
        x[7777] = v
    with pytest.raises(NonFiniteError):
        linear_combination(xs, [1.0, 1.0], out_dtype)


def _stored(
    tmp_path: Path, tensors: dict[str, torch.Tensor]
) -> tuple[int, dict[str, tuple[int, int, str]]]:
    path = tmp_path / "inputs.safetensors"
    save_file(tensors, str(path))
    fd = os.open(path, os.O_RDONLY)
    sf = SafetensorsFile(path)
    return fd, {name: (fd, loc.begin, loc.info.code) for name, loc in sf.tensors.items()}


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_combine_files_writes_what_linear_combination_returns(
    out_dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "TASK", 1 << 16)  # several ranges of FILE_STEP elements
    xs, coeffs = _random(200_003, [torch.bfloat16, torch.float32, torch.float16], seed=3)
    fd, where = _stored(tmp_path, {f"x{i}": x for i, x in enumerate(xs)})
    out_path = tmp_path / "out.bin"
    out_fd = os.open(out_path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(out_fd, b"header", 0)
        assert combine_files(
            out_fd, 6, code_of(out_dtype), [where[f"x{i}"] for i in range(3)], coeffs, 200_003
        ).wait()
    finally:
        os.close(out_fd)
        os.close(fd)
    data = out_path.read_bytes()
    assert data[:6] == b"header" and len(data) == 6 + 200_003 * out_dtype.itemsize
    got = torch.frombuffer(bytearray(data[6:]), dtype=out_dtype)
    assert torch.equal(got, linear_combination(xs, coeffs, out_dtype))


def test_combine_files_names_the_input_that_ends_early(tmp_path: Path) -> None:
    fd, where = _stored(tmp_path, {"a": torch.ones(1000), "b": torch.ones(1000)})
    out_fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError) as caught:
            combine_files(
                out_fd, 0, "F32", [where["a"], where["b"]], [0.5, 0.5], 2000
            ).wait()  # twice the stored length
    finally:
        os.close(out_fd)
        os.close(fd)
    assert caught.value.filename == 1 and "ends before" in str(caught.value)


def test_gram_matches_a_float64_reference_and_reads_the_same_bits_from_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "TASK", 1 << 16)  # several ranges of FILE_STEP elements
    xs, _ = _random(200_003, [torch.bfloat16, torch.float32, torch.float16], seed=4)
    got = kernel.gram(xs)
    assert got is not None
    exact = [[float(torch.dot(a.double(), b.double())) for b in xs] for a in xs]
    assert all(abs(g - e) <= 1e-12 * abs(e) for gr, er in zip(got, exact) for g, e in zip(gr, er))
    fd, where = _stored(tmp_path, {f"x{i}": x for i, x in enumerate(xs)})
    try:
        assert kernel.gram_files([where[f"x{i}"] for i in range(3)], 200_003) == got
    finally:
        os.close(fd)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_the_export_writes_the_in_memory_merge_bit_for_bit(method: str, tmp_path: Path) -> None:
    # The export combines file to file; a search trial merges in memory: same bits.
    from recycler.export.model_dir import write_model_dir

    dirs = make_pool(tmp_path / "pool")  # bf16, sharded fp32 and fp16 checkpoints, an fp32 base
    pool = Pool.open([dirs["c0"], dirs["c1"], dirs["c2"]], dirs["base"])
    models = [ModelSpec(str(c.path), weight=w) for c, w in zip(pool.checkpoints, [0.5, 0.3, 0.4])]
    recipe = Recipe(
        method,
        models,
        base_model=str(dirs["base"]),
        parameters={"normalize": True, "lambda": 1.3},
        dtype="bfloat16",
    )
    merger = FileMerger(pool, recipe)
    assert all(
        merger.plan(name) is not None for name in pool.tensor_names
    )  # the whole model goes file to file
    write_model_dir(tmp_path / "out", pool, recipe)
    written = load_state(tmp_path / "out")
    in_memory = merge_state_dict(pool, recipe)
    assert written.keys() == in_memory.keys()
    assert all(torch.equal(written[k], in_memory[k]) for k in written)


def test_a_lora_member_sends_only_its_targets_through_memory(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from recycler.export.model_dir import write_model_dir

    dirs = make_pool(tmp_path / "pool")
    base = AutoModelForCausalLM.from_pretrained(dirs["base"])
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter.save_pretrained(tmp_path / "adapter")
    pool = Pool.open([dirs["c0"], tmp_path / "adapter"], dirs["base"])
    recipe = Recipe(
        "linear", [ModelSpec(str(c.path), weight=0.5) for c in pool.checkpoints], dtype="bfloat16"
    )
    merger = FileMerger(pool, recipe)
    in_memory_only = {name for name in pool.tensor_names if merger.plan(name) is None}
    assert in_memory_only and all("q_proj" in name for name in in_memory_only)
    write_model_dir(tmp_path / "out", pool, recipe)
    written, in_memory = load_state(tmp_path / "out"), merge_state_dict(pool, recipe)
    assert written.keys() == in_memory.keys() and all(
        torch.equal(written[k], in_memory[k]) for k in written
    )


@pytest.mark.parametrize("case", ["linear", "slerp", "slerp_from_base"])
def test_a_linear_or_slerp_merge_runs_without_importing_pytorch(case: str, tmp_path: Path) -> None:
    # File to file, the merge needs no tensor: PyTorch's import (~2 s) is skipped. SLERP
    # reads its inner products from the files first (kernel.gram_files); the bits are
    # those of the in-memory merge (kernel.gram).
    import subprocess
    import sys

    import yaml

    dirs = make_pool(tmp_path / "pool")
    recipe = tmp_path / "recipe.yaml"
    base = dirs["base"] if case == "slerp_from_base" else None  # fp32: θ_a at t = 0
    if case == "linear":
        models = [
            {"model": str(dirs[k]), "parameters": {"weight": 1.0}} for k in ("c0", "c1", "c2")
        ]
        extra: dict[str, object] = {}
    else:
        models = [{"model": str(dirs[k])} for k in (("c1",) if base else ("c0", "c1"))]
        t = [{"filter": "self_attn", "value": [0, 0.7, 1]}, {"value": 0.3}]
        extra = {"parameters": {"t": t}, **({"base_model": str(base)} if base else {})}
    method = "linear" if case == "linear" else "slerp"
    recipe.write_text(
        yaml.safe_dump({"merge_method": method, "models": models, "dtype": "bfloat16", **extra})
    )
    out = tmp_path / "out"
    check = (
        "import sys; from recycler.cli import main; code = main(['merge', sys.argv[1], "
        "sys.argv[2]]); "
        "assert code == 0, code; assert 'torch' not in sys.modules, 'PyTorch was imported'"
    )
    subprocess.run([sys.executable, "-c", check, str(recipe), str(out)], check=True, timeout=120)
    pool = Pool.open([Path(m["model"]) for m in models], base)
    in_memory = merge_state_dict(pool, Recipe.from_dict(yaml.safe_load(recipe.read_text())))
    written = load_state(out)
    assert written.keys() == in_memory.keys() and all(
        torch.equal(written[k], in_memory[k]) for k in written
    )
