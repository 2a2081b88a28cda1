"""`recycler merge` gives mergekit's tensors for the same recipe YAML and inputs.

A tiny Llama pool (base + 3 checkpoints: two bf16, one fp32; hidden 32, 2 layers,
vocab 64) is written with transformers' save_pretrained. Every recipe below is
merged by the real CLI (`recycler.cli.main(["merge", RECIPE, OUT])`, all recipes in
one process, the random ones again in a second) and checked:

- always against tests/reference_merge.py, an independent float64 implementation
  written from the papers (so the test never passes without checking anything);
- when ./.venv-mergekit exists (experiments/mergekit_env.sh makes it), against
  mergekit 0.1.5 itself, run as mergekit-yaml's own entry point in that venv; and
  the reference against mergekit, so that the reference is known to be right when
  mergekit is absent.

Tolerances are in unit roundoffs u (2^-8 for bf16, 2^-24 for fp32) of S, the
per-entry size of what a merge adds up (max_i |θ_i| · (1 + Σ |c_i|)); any order
of summation stays within a few u·S, a wrong normalize / lambda / density / sign
rule is off by a large fraction of S (`test_tolerance_rejects_wrong_semantics`
checks that). mergekit computes in the recipe's dtype (bf16 task vectors) while
recycler accumulates in fp32, so bf16 recipes compare to mergekit at bf16 rounding.
TIES entries at a magnitude tie of the k-th largest task-vector entry, or whose
sign election is a near-tie, may legitimately differ and are left out (few %).
DARE masks come from different RNGs: each merged entry must equal the merge for
SOME keep/drop pattern, with each model kept at its density, and the merge must be
unbiased with the variance DARE predicts; mergekit is held to the same statistics.

Every other mergekit method (slerp, nuslerp, multislerp, karcher, model_stock,
nearswap, arcee_fusion, sce, ram, ramplus_tl, passthrough, breadcrumbs[_ties]) is
compared with mergekit directly, both computing in fp32, entry by entry within bf16
rounding of the inputs' magnitude, and by the logits of the merged models. The random
ones (DARE, DELLA) must be as far from mergekit's merge as a second mergekit run with
another seed is: neither a copy of it nor the unrandomised expectation (which is
closer, by about 1/√2).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_VENV = Path(os.environ.get("RECYCLER_MERGEKIT_VENV", ROOT / ".venv-mergekit"))
MERGEKIT_PYTHON = MERGEKIT_VENV / "bin" / "python"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ref_mod = _load("reference_merge", ROOT / "tests" / "reference_merge.py")
pool_mod = _load("make_pool", ROOT / "experiments" / "make_pool.py")

U = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
DTYPES = ("bfloat16", "bfloat16", "float32")
WEIGHTS = (0.6, 0.4, 0.7)
DENSITIES = (0.5, 0.3, 0.7)


def _models(
    ckpts: list[str], weights: tuple[Any, ...] = WEIGHTS, densities: tuple[float, ...] | None = None
) -> list[dict[str, Any]]:
    out = []
    for i, (c, w) in enumerate(zip(ckpts, weights)):
        params: dict[str, Any] = {"weight": w}
        if densities is not None:
            params["density"] = densities[i]
        out.append({"model": c, "parameters": params})
    return out


def build_recipes(base: str, ckpts: list[str]) -> dict[str, dict[str, Any]]:
    r: dict[str, dict[str, Any]] = {}
    for dt in ("bfloat16", "float32"):
        r[f"linear-{dt}"] = {"merge_method": "linear", "models": _models(ckpts), "dtype": dt}
        r[f"ta-{dt}"] = {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": _models(ckpts),
            "parameters": {"lambda": 0.8},
            "dtype": dt,
        }
        r[f"ties-{dt}"] = {
            "merge_method": "ties",
            "base_model": base,
            "models": _models(ckpts, densities=DENSITIES),
            "dtype": dt,
        }
    r["linear-nonorm-bfloat16"] = {
        "merge_method": "linear",
        "models": _models(ckpts),
        "parameters": {"normalize": False},
        "dtype": "bfloat16",
    }
    # gradients: interpolated over t = layer / (n_layers - 1); t = 0 outside the layers
    r["linear-gradient-bfloat16"] = {
        "merge_method": "linear",
        "models": _models(ckpts, weights=([0.1, 0.9], [1.0, 0.5, 0.2], 0.5)),
        "dtype": "bfloat16",
    }
    # filters: the first entry whose filter is absent, "*" or a substring of the tensor name
    r["linear-filter-bfloat16"] = {
        "merge_method": "linear",
        "models": _models(
            ckpts,
            weights=(
                0.6,
                [{"filter": "mlp", "value": 0.7}, {"filter": "*", "value": 0.2}],
                [{"filter": "self_attn", "value": 0.3}, {"value": 0.5}],
            ),
        ),
        "dtype": "bfloat16",
    }
    r["ta-normalize-bfloat16"] = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": _models(ckpts),
        "parameters": {"normalize": True, "lambda": 1.5},
        "dtype": "bfloat16",
    }
    # density for every model from the recipe-level parameters
    r["ties-nonorm-bfloat16"] = {
        "merge_method": "ties",
        "base_model": base,
        "models": _models(ckpts),
        "parameters": {"normalize": False, "lambda": 1.2, "density": 0.4},
        "dtype": "bfloat16",
    }
    r["dare_linear-bfloat16"] = {
        "merge_method": "dare_linear",
        "base_model": base,
        "models": _models(ckpts, densities=DENSITIES),
        "dtype": "bfloat16",
    }
    r["dare_ties-bfloat16"] = {
        "merge_method": "dare_ties",
        "base_model": base,
        "models": _models(ckpts, densities=DENSITIES),
        "dtype": "bfloat16",
    }
    r.update(build_method_recipes(base, ckpts))
    return r


def build_method_recipes(base: str, ckpts: list[str]) -> dict[str, dict[str, Any]]:
    """One fp32 recipe per method beyond the five above (mergekit's parameter names)."""
    plain = [{"model": c} for c in ckpts]
    two = _models(ckpts[:2], weights=(0.6, 0.4))
    sparse = _models(ckpts, densities=(0.6, 0.5, 0.7))
    r: dict[str, dict[str, Any]] = {
        # the base listed among the models too, as mergekit's slerp examples do
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": ckpts[0]}],
            "parameters": {"t": [0.2, 0.7]},
        },
        # mergekit's examples/gradient-slerp.yml in its `models:` form: layer gradients as the
        # values of filter entries (the pool's 2 layers take each gradient's ends)
        "gradient_slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": ckpts[0]}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        },
        # per-model weight and top-level lambda given as gradients under filters
        "ta_filter_gradients": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {
                    "model": ckpts[0],
                    "parameters": {
                        "weight": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]
                    },
                },
                {"model": ckpts[1], "parameters": {"weight": [0.9, 0.1]}},
            ],
            "parameters": {"lambda": [{"filter": "mlp", "value": [1.0, 0.4]}, {"value": 1.2}]},
        },
        "nuslerp": {"merge_method": "nuslerp", "models": two},
        "nuslerp-rows": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": two,
            "parameters": {"nuslerp_flatten": False},
        },
        "multislerp": {"merge_method": "multislerp", "base_model": base, "models": _models(ckpts)},
        "karcher": {"merge_method": "karcher", "models": plain},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": plain},
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": plain[:1],
            "parameters": {"t": 0.01},
        },
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": plain[:1]},
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "models": plain,
            "parameters": {"select_topk": 0.5},
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": plain,
            "parameters": {"epsilon": 0.01},
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": plain,
            "parameters": {"epsilon": 0.01, "r": 0.5, "alpha": 0.5},
        },
        "passthrough": {
            "merge_method": "passthrough",
            "models": [{"model": ckpts[0], "parameters": {"scale": 0.5}}],
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": sparse,
            "parameters": {"gamma": 0.05},
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": sparse,
            "parameters": {"gamma": 0.05},
        },
        "della": {
            "merge_method": "della",
            "base_model": base,
            "models": _models(ckpts, densities=DENSITIES),
            "parameters": {"epsilon": 0.1},
        },
        "della_linear": {
            "merge_method": "della_linear",
            "base_model": base,
            "models": _models(ckpts, densities=DENSITIES),
            "parameters": {"epsilon": 0.1},
        },
    }
    return {f"{name}-float32": {**recipe, "dtype": "float32"} for name, recipe in r.items()}


DETERMINISTIC = [
    "linear-bfloat16",
    "linear-float32",
    "linear-nonorm-bfloat16",
    "linear-gradient-bfloat16",
    "linear-filter-bfloat16",
    "ta-bfloat16",
    "ta-float32",
    "ta-normalize-bfloat16",
    "ties-bfloat16",
    "ties-float32",
    "ties-nonorm-bfloat16",
]
DARE = ["dare_linear-bfloat16", "dare_ties-bfloat16"]
METHOD_PARITY = [
    f"{m}-float32"
    for m in (
        "slerp",
        "gradient_slerp",
        "ta_filter_gradients",
        "nuslerp",
        "nuslerp-rows",
        "multislerp",
        "karcher",
        "model_stock",
        "nearswap",
        "arcee_fusion",
        "sce",
        "ram",
        "ramplus_tl",
        "passthrough",
        "breadcrumbs",
        "breadcrumbs_ties",
    )
]
RANDOM = [*DARE, "della-float32", "della_linear-float32"]

# mergekit-yaml's own click entry point, once per recipe, in one process of the
# mergekit venv (one interpreter start instead of one per recipe keeps this fast).
MERGEKIT_DRIVER = """
import json, sys
from mergekit.scripts.run_yaml import main
for config, out, seed in json.loads(sys.argv[1]):
    main([config, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
          "--random-seed", str(seed)], standalone_mode=False)
"""


@dataclass
class Runs:
    root: Path
    recipes: dict[str, dict[str, Any]]
    ours: dict[str, Path]
    ours_again: dict[str, Path]
    mergekit: dict[str, Path] | None
    mergekit_seed1: dict[str, Path]  # the random recipes again, with --random-seed 1
    mergekit_skip_reason: str
    errors: dict[str, str]  # job name -> why its command failed

    def out(self, who: str, name: str) -> Path:
        """The output dir of one run; fails the calling test if that run failed."""
        if who in ("mergekit", "mergekit-seed1"):
            assert self.mergekit is not None
            if "mergekit" in self.errors:
                pytest.fail(self.errors["mergekit"], pytrace=False)
            return self.mergekit[name] if who == "mergekit" else self.mergekit_seed1[name]
        key = name if who == "ours" else f"{name} (again)"
        if key in self.errors:
            pytest.fail(self.errors[key], pytrace=False)
        return (self.ours if who == "ours" else self.ours_again)[name]


# recycler's own entry point, once per recipe, in one process (as for mergekit above):
# prints {recipe name: why it failed} for those that did not exit 0.
RECYCLER_DRIVER = """
import contextlib, io, json, sys, traceback
from recycler.cli import main
failed = {}
for name, config, out in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(["merge", config, out])
    except Exception:
        code, err = 1, io.StringIO(traceback.format_exc())
    if code != 0:
        failed[name] = f"recycler merge {name}.yaml exited {code}: {err.getvalue()[-3000:]}"
print(json.dumps(failed))
"""


def _run(cmd: list[str], what: str) -> tuple[str | None, str]:
    """Run a command; (None on success, else why it failed; its stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        return f"{what} exited {proc.returncode}:\n{proc.stderr[-4000:]}", proc.stdout
    return None, proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("parity")
    spec = pool_mod.PoolSpec(
        shape=pool_mod.SHAPES["tiny"],
        n_checkpoints=3,
        with_base=True,
        checkpoint_dtypes=DTYPES,
        delta_scale=0.5,
        seed=1,
    )
    pool = pool_mod.build_pool(root / "pool", spec)
    assert pool.base is not None
    recipes = build_recipes(str(pool.base), [str(c) for c in pool.checkpoints])
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    jobs: list[tuple[str, list[str], str]] = []  # (job name, command, description)
    ours = {n: root / "ours" / n for n in recipes}
    ours_again = {n: root / "ours-again" / n for n in RANDOM}
    for label, outs in (("", ours), (" (again)", ours_again)):
        triples = [
            [name + label, str(root / f"{name}.yaml"), str(out)] for name, out in outs.items()
        ]
        cmd = [sys.executable, "-c", RECYCLER_DRIVER, json.dumps(triples)]
        jobs.append(
            ("recycler" + label, cmd, f"recycler merge{label} (its entry point, in one process)")
        )

    mergekit: dict[str, Path] | None = None
    mergekit_seed1 = {n: root / "mergekit-seed1" / n for n in RANDOM}
    reason = ""
    if MERGEKIT_PYTHON.is_file():
        mergekit = {n: root / "mergekit" / n for n in recipes}
        pairs = [[str(root / f"{n}.yaml"), str(p), 0] for n, p in mergekit.items()]
        pairs += [[str(root / f"{n}.yaml"), str(p), 1] for n, p in mergekit_seed1.items()]
        cmd = [str(MERGEKIT_PYTHON), "-c", MERGEKIT_DRIVER, json.dumps(pairs)]
        jobs.insert(0, ("mergekit", cmd, "mergekit-yaml (its entry point, in the mergekit venv)"))
    else:
        reason = (
            f"mergekit venv not found at {MERGEKIT_VENV} (run experiments/mergekit_env.sh); "
            "checked against tests/reference_merge.py only"
        )

    with ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(lambda job: _run(job[1], job[2]), jobs))
    errors: dict[str, str] = {}
    for (job, _, _), (err, stdout) in zip(jobs, results):
        if job == "mergekit":
            if err is not None:
                errors["mergekit"] = err
            continue
        label = job.removeprefix("recycler")
        names = ours if not label else ours_again
        failed = (
            {n + label: err for n in names}
            if err is not None
            else json.loads(stdout.strip().splitlines()[-1])
        )
        errors.update(failed)
    return Runs(root, recipes, ours, ours_again, mergekit, mergekit_seed1, reason, errors)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = ref_mod.load_checkpoint(path)
    return out


def _ulp_out(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at |x| (a cast to dtype is off by <= 0.5)."""
    tiny = torch.finfo(dtype).tiny
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(tiny))))


@dataclass
class Check:
    worst: float  # max |diff| / tol over compared entries
    where: str
    ambiguous_fraction: float
    compared: int


def compare(
    got: dict[str, torch.Tensor],
    want: Callable[[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    names: list[str],
) -> Check:
    """want(name) -> (expected float64, tolerance per entry, mask of entries to leave out)."""
    worst, where, amb, total = 0.0, "", 0, 0
    for name in names:
        expected, tol, skip = want(name)
        actual = got[name].to(torch.float64)
        assert actual.shape == expected.shape, (
            f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        )
        ratio = ((actual - expected).abs() / tol)[~skip]
        amb += int(skip.sum())
        total += skip.numel()
        if ratio.numel() and float(ratio.max()) > worst:
            i = int(
                torch.argmax(
                    torch.where(skip, torch.zeros_like(actual), (actual - expected).abs() / tol)
                )
            )
            worst = float(ratio.max())
            where = (
                f"{name}[flat {i}]: got {actual.reshape(-1)[i].item():.8g}, "
                f"want {expected.reshape(-1)[i].item():.8g}, tol {tol.reshape(-1)[i].item():.3g}"
            )
    return Check(worst, where, amb / max(total, 1), total - amb)


def _reference(runs: Runs, name: str) -> Any:
    return ref_mod.ReferenceMerge(runs.recipes[name])


def _dtype(runs: Runs, name: str) -> torch.dtype:
    dt: torch.dtype = getattr(torch, runs.recipes[name]["dtype"])
    return dt


# --------------------------------------------------------------------------- deterministic


def _ours_vs_reference(
    ref: Any, dtype: torch.dtype, name: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    res = ref.merge(name, tie_rel=1e-6, sign_rel=1e-5)
    tol = _ulp_out(res.out, dtype) + 16 * U[torch.float32] * ref.coefficient_scale(name)
    return res.out, tol, res.ambiguous


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_matches_reference(runs: Runs, name: str) -> None:
    ref = _reference(runs, name)
    dtype = _dtype(runs, name)
    got = _tensors(runs.out("ours", name))
    assert sorted(got) == sorted(ref.names), "recycler's output has other tensors than its inputs"
    bad = {k: v.dtype for k, v in got.items() if v.dtype != dtype}
    assert not bad, f"recipe dtype {dtype}, but got {bad}"
    check = compare(got, lambda n: _ours_vs_reference(ref, dtype, n), ref.names)
    assert check.ambiguous_fraction < 0.05, check
    assert check.worst <= 1.0, f"{name}: recycler differs from the reference: {check.where}"


def _wrong(recipe: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Plausible misreadings of a recipe, each of which the tolerance must reject."""
    out = []
    method = recipe["merge_method"]
    params = dict(recipe.get("parameters") or {})
    normalize = params.get("normalize", ref_mod.NORMALIZE_DEFAULT[method])
    out.append(
        ("normalize flipped", {**recipe, "parameters": {**params, "normalize": not normalize}})
    )
    if method != "linear":
        out.append(
            (
                "lambda * 1.1",
                {**recipe, "parameters": {**params, "lambda": 1.1 * params.get("lambda", 1.0)}},
            )
        )
    if method == "ties":
        if "density" in params:
            out.append(
                (
                    "density + 0.05",
                    {**recipe, "parameters": {**params, "density": params["density"] + 0.05}},
                )
            )
        else:
            models = [
                {
                    **m,
                    "parameters": {**m["parameters"], "density": m["parameters"]["density"] + 0.05},
                }
                for m in recipe["models"]
            ]
            out.append(("density + 0.05", {**recipe, "models": models}))
        out.append(("task_arithmetic instead", {**recipe, "merge_method": "task_arithmetic"}))
    return out


@pytest.mark.parametrize(
    "name",
    [
        "linear-bfloat16",
        "linear-gradient-bfloat16",
        "linear-filter-bfloat16",
        "ta-bfloat16",
        "ties-bfloat16",
        "ties-nonorm-bfloat16",
    ],
)
def test_tolerance_rejects_wrong_semantics(runs: Runs, name: str) -> None:
    """The comparison can fail: each misreading of the recipe is far outside it."""
    ref = _reference(runs, name)
    dtype = _dtype(runs, name)
    for what, wrong in _wrong(runs.recipes[name]):
        wrong_ref = ref_mod.ReferenceMerge(wrong)
        as_if = {n: wrong_ref.merge(n).out.to(dtype) for n in ref.names}
        check = compare(as_if, lambda n: _ours_vs_reference(ref, dtype, n), ref.names)
        assert check.worst > 4.0, f"{name}: a merge with {what} would pass ({check.worst:.2f})"


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_matches_mergekit(runs: Runs, name: str) -> None:
    if runs.mergekit is None:
        pytest.skip(runs.mergekit_skip_reason)
    ref = _reference(runs, name)
    dtype = _dtype(runs, name)
    got = _tensors(runs.out("ours", name))
    mk = _tensors(runs.out("mergekit", name))
    assert sorted(mk) == sorted(got)

    def want(n: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        exact = ref.merge(n, tie_rel=1e-6, sign_rel=1e-5)
        emulated = ref.merge(n, compute_dtype=dtype, tie_rel=1e-6, sign_rel=2.0**-6)
        # entries where rounding the task vectors to the recipe dtype (as mergekit does)
        # changes a TIES decision are not comparable between fp32 and bf16 arithmetic
        differs = (
            (exact.decisions != emulated.decisions).any(0)
            if exact.decisions.numel()
            else torch.zeros_like(exact.ambiguous)
        )
        skip = exact.ambiguous | emulated.ambiguous | differs
        tol = 6 * U[dtype] * ref.coefficient_scale(n) + _ulp_out(exact.out, dtype)
        return mk[n].to(torch.float64), tol, skip

    check = compare(got, want, ref.names)
    assert check.ambiguous_fraction < 0.08, check
    assert check.worst <= 1.0, f"{name}: recycler differs from mergekit: {check.where}"


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_reference_matches_mergekit(runs: Runs, name: str) -> None:
    """The reference computes what mergekit computes (mergekit rounds to the recipe dtype)."""
    if runs.mergekit is None:
        pytest.skip(runs.mergekit_skip_reason)
    ref = _reference(runs, name)
    dtype = _dtype(runs, name)
    mk = _tensors(runs.out("mergekit", name))

    def want(n: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        res = ref.merge(n, compute_dtype=dtype, tie_rel=1e-6, sign_rel=2.0**-6)
        return res.out, 4 * U[dtype] * ref.coefficient_scale(n), res.ambiguous

    check = compare(mk, want, ref.names)
    assert check.ambiguous_fraction < 0.05, check
    assert check.worst <= 1.0, f"{name}: mergekit differs from the reference: {check.where}"


# --------------------------------------------------------------------------- DARE


@pytest.mark.parametrize("name", DARE)
def test_dare_is_some_mask(runs: Runs, name: str) -> None:
    """Each entry is the merge for one keep/drop pattern (kept entries × 1/density), and
    each model is kept at its density (binomial, 5 sigma)."""
    ref = _reference(runs, name)
    dtype = _dtype(runs, name)
    got = _tensors(runs.out("ours", name))
    kept = torch.zeros(len(DENSITIES))
    decided = torch.zeros(len(DENSITIES))
    worst, where = 0.0, ""
    for n in ref.names:
        cands, patterns = ref.dare_candidates(n)
        actual = got[n].to(torch.float64)
        tol = _ulp_out(actual, dtype) + 16 * U[torch.float32] * ref.coefficient_scale(n)
        dist = (cands - actual).abs() / tol
        best = dist.amin(0)
        if float(best.max()) > worst:
            worst, where = float(best.max()), n
        match = dist <= 1.0  # [patterns, *shape]
        flat = match.reshape(match.shape[0], -1)
        for i in range(len(DENSITIES)):
            # entries where every matching pattern agrees on model i's keep/drop
            kept_i = flat[patterns[:, i]].any(0)
            dropped_i = flat[~patterns[:, i]].any(0)
            sure = kept_i ^ dropped_i
            kept[i] += float((kept_i & sure).sum())
            decided[i] += float(sure.sum())
    assert worst <= 1.0, (
        f"{name}: an entry of {where} is no keep/drop pattern's merge ({worst:.2f} tol)"
    )
    for i, d in enumerate(DENSITIES):
        n_i = float(decided[i])
        assert n_i > 5000, f"model {i}: only {n_i} entries decide the mask"
        frac = float(kept[i]) / n_i
        sigma = math.sqrt(d * (1 - d) / n_i)
        assert abs(frac - d) < 5 * sigma + 1e-3, f"model {i}: kept {frac:.4f}, density {d}"


def _dare_z(ref: Any, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    zs = []
    for n in ref.names:
        mean, var = ref.expected_dare(n)
        ok = var > 0
        zs.append((tensors[n].to(torch.float64) - mean)[ok] / var[ok].sqrt())
    return torch.cat(zs)


def test_dare_linear_statistics(runs: Runs) -> None:
    """E[merge] = task arithmetic and Var = Σ (c_i τ_i)² (1 − d)/d: recycler, and mergekit."""
    name = "dare_linear-bfloat16"
    ref = _reference(runs, name)
    sources = {"recycler": runs.out("ours", name)}
    if runs.mergekit is not None:
        sources["mergekit"] = runs.out("mergekit", name)
    for who, path in sources.items():
        z = _dare_z(ref, _tensors(path))
        assert z.numel() > 20000
        assert abs(float(z.mean())) < 0.05, (
            f"{who}: DARE merge is biased (mean z {float(z.mean()):.3f})"
        )
        assert abs(float(z.var()) - 1) < 0.1, (
            f"{who}: DARE variance off (var z {float(z.var()):.3f})"
        )


def test_dare_ties_like_mergekit(runs: Runs) -> None:
    """Same statistics as mergekit's dare_ties: spread of the merged deltas, entries left at
    base."""
    if runs.mergekit is None:
        pytest.skip(runs.mergekit_skip_reason)
    name = "dare_ties-bfloat16"
    ref = _reference(runs, name)
    ours, mk = _tensors(runs.out("ours", name)), _tensors(runs.out("mergekit", name))
    assert ref.base is not None
    d_ours = torch.cat([(ours[n].double() - ref.base[n].double()).reshape(-1) for n in ref.names])
    d_mk = torch.cat([(mk[n].double() - ref.base[n].double()).reshape(-1) for n in ref.names])
    ratio = float(d_ours.std() / d_mk.std())
    assert abs(ratio - 1) < 0.1, f"std of merged deltas: recycler / mergekit = {ratio:.3f}"
    same_ours = float((d_ours == 0).double().mean())
    same_mk = float((d_mk == 0).double().mean())
    assert abs(same_ours - same_mk) < 0.03, (
        f"entries left at base: {same_ours:.3f} vs {same_mk:.3f}"
    )


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_reproduce(runs: Runs, name: str) -> None:
    """The same recipe gives the same tensors, bit for bit."""
    a, b = _tensors(runs.out("ours", name)), _tensors(runs.ours_again[name])
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n], b[n]), f"{name}: {n} differs between two runs"


# --------------------------------------------------------------------------- every other method


def _inputs_of(recipe: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The recipe's base (first, where it has one) and models, each read once."""
    paths = ([recipe["base_model"]] if "base_model" in recipe else []) + [
        m["model"] for m in recipe["models"]
    ]
    return [_tensors(Path(p)) for p in dict.fromkeys(paths)]


def _band_ties(
    recipe: dict[str, Any], inputs: list[dict[str, torch.Tensor]], name: str
) -> torch.Tensor:
    """Entries where some model's |τ| ties across an edge of Breadcrumbs' band: which of
    the tied entries is kept depends on the sort's order (mergekit's is unstable)."""
    base = inputs[0][name].float()
    ambiguous = torch.zeros(base.shape, dtype=torch.bool)
    gamma = recipe["parameters"]["gamma"]
    for model, ckpt in zip(recipe["models"], inputs[1:]):
        magnitude = (ckpt[name].float() - base).abs().reshape(-1)
        ordered = magnitude.sort().values
        n = magnitude.numel()
        target = int(model["parameters"]["density"] * n)
        lo = max(0, n - target - int(gamma * n))
        for inside, outside in ((lo, lo - 1), (lo + target - 1, lo + target)):
            if 0 <= outside < n and ordered[inside] == ordered[outside]:
                ambiguous |= (magnitude == ordered[inside]).view(base.shape)
    return ambiguous


@pytest.mark.parametrize("name", METHOD_PARITY)
def test_method_matches_mergekit(runs: Runs, name: str) -> None:
    """Entry by entry within bf16 rounding of the largest input at that entry (both in fp32)."""
    if runs.mergekit is None:
        pytest.skip(runs.mergekit_skip_reason)
    recipe = runs.recipes[name]
    got, mk = _tensors(runs.out("ours", name)), _tensors(runs.out("mergekit", name))
    assert sorted(got) == sorted(mk), "recycler's output has other tensors than mergekit's"
    inputs = _inputs_of(recipe)
    worst, where, skipped, total = 0.0, "", 0, 0
    for n in mk:
        assert got[n].dtype == torch.float32 and got[n].shape == mk[n].shape, n
        scale = torch.stack([t[n].to(torch.float64).abs() for t in inputs]).amax(0)
        tol = U[torch.bfloat16] * scale + 1e-30
        ratio = (got[n].to(torch.float64) - mk[n].to(torch.float64)).abs() / tol
        if recipe["merge_method"].startswith("breadcrumbs"):
            skip = _band_ties(recipe, inputs, n)
            ratio = ratio[~skip]
            skipped += int(skip.sum())
        total += mk[n].numel()
        if ratio.numel() and float(ratio.max()) > worst:
            worst, where = float(ratio.max()), n
    assert skipped / total < 0.02, f"{name}: {skipped} of {total} entries at magnitude ties"
    assert worst <= 1.0, (
        f"{name}: recycler differs from mergekit in {where} by {worst:.3g} bf16 roundings"
    )


def _logits(model_dir: Path, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The model's logits on fixed tokens (its tensors replaced by `tensors` where given)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if tensors is not None:
        model.load_state_dict(tensors, strict=False)
    ids = (torch.arange(24) * 7 % model.config.vocab_size).view(2, 12)
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


@pytest.mark.parametrize("name", [*METHOD_PARITY, "ties-float32", "ta-float32"])
def test_method_logits_match_mergekit(runs: Runs, name: str) -> None:
    """The merged models' logits on fixed tokens agree within bf16 rounding of their range.

    Entries at a magnitude tie (TIES, Breadcrumbs: left out entry by entry above, as
    either choice is right) are taken from recycler's merge into mergekit's model, so
    that the logits compare the rest."""
    if runs.mergekit is None:
        pytest.skip(runs.mergekit_skip_reason)
    recipe = runs.recipes[name]
    replaced = None
    if recipe["merge_method"] in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        ours_t, mk_t = _tensors(runs.out("ours", name)), _tensors(runs.out("mergekit", name))
        if recipe["merge_method"] == "ties":
            ref = _reference(runs, name)
            tied = {n: ref.merge(n, tie_rel=1e-6, sign_rel=1e-5).ambiguous for n in mk_t}
        else:
            inputs = _inputs_of(recipe)
            tied = {n: _band_ties(recipe, inputs, n) for n in mk_t}
        replaced = {n: torch.where(tied[n], ours_t[n], mk_t[n]) for n in mk_t}
    ours, mk = _logits(runs.out("ours", name)), _logits(runs.out("mergekit", name), replaced)
    gap = float((ours - mk).abs().max())
    assert gap <= U[torch.bfloat16] * float(mk.abs().max()), f"{name}: logits differ by {gap:.3g}"


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in b))


@pytest.mark.parametrize("name", RANDOM)
def test_random_method_as_close_to_mergekit_as_its_own_reseed(runs: Runs, name: str) -> None:
    if runs.mergekit is None:
        pytest.skip(runs.mergekit_skip_reason)
    ours = _tensors(runs.out("ours", name))
    mk, mk_again = _tensors(runs.out("mergekit", name)), _tensors(runs.out("mergekit-seed1", name))
    ratio = _distance(ours, mk) / _distance(mk_again, mk)
    assert 0.85 < ratio < 1.15, (
        f"{name}: ‖ours − mergekit‖ / ‖mergekit(seed 1) − mergekit(seed 0)‖ = {ratio:.3f}"
    )
