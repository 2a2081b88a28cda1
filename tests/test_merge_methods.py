"""The merge methods against their formulas, computed independently in float64."""

from __future__ import annotations

import pytest
import torch

from recycler.errors import RecyclerError
from recycler.merge.description import MergeInputs, TensorParams
from recycler.merge.kernel import NonFiniteError, linear_combination
from recycler.merge.methods import METHODS
from recycler.merge.sparsify import dare_mask, magnitude_trim
from recycler.merge.weights import mwa_weights_from_values, uniform_weights


def _versions(
    n: int = 3,
    shape: tuple[int, ...] = (64, 48),
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base.to(dtype), [
        (base + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)
    ]


def _inputs(versions: list[torch.Tensor], base: torch.Tensor | None, **kw: object) -> MergeInputs:
    defaults: dict[str, object] = {
        "weights": [0.5, 0.3, 0.2],
        "out_dtype": torch.float32,
        "densities": [1.0] * len(versions),
    }
    defaults.update(kw)
    return MergeInputs(versions=versions, base=base, **defaults)  # type: ignore[arg-type]


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_the_weighted_average(normalize: bool) -> None:
    _, vs = _versions()
    w = [0.5, 0.3, 0.4]
    got = METHODS["linear"].fn(_inputs(vs, None, weights=w, normalize=normalize))
    want = sum(wi * v.double() for wi, v in zip(w, vs))
    if normalize:
        want = want / sum(w)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_fp32_accumulation_then_one_rounding() -> None:
    # bf16 inputs, bf16 output: the result is the exact average rounded once.
    _, vs = _versions(n=4)
    w = uniform_weights(4)
    got = METHODS["linear"].fn(
        _inputs(vs, None, weights=w, normalize=True, out_dtype=torch.bfloat16)
    )
    exact = (sum(v.double() for v in vs) / 4).to(torch.bfloat16)
    assert (got.float() - exact.float()).abs().max() <= exact.float().abs().max() * 2**-8


def test_task_arithmetic() -> None:
    base, vs = _versions()
    w, lam = [0.5, 0.3, 0.2], 0.8
    got = METHODS["task_arithmetic"].fn(_inputs(vs, base, weights=w, lambda_=lam))
    want = base.double() + lam * sum(wi * (v.double() - base.double()) for wi, v in zip(w, vs))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_ties_by_hand() -> None:
    base = torch.zeros(4)
    # Task vectors; density 0.5 keeps the two largest magnitudes of each.
    t1 = torch.tensor([3.0, -1.0, 0.5, 2.0])  # keeps 3, 2
    t2 = torch.tensor([-4.0, 1.0, 0.2, 0.1])  # keeps -4, 1
    inp = _inputs([t1, t2], base, weights=[1.0, 0.5], densities=[0.5, 0.5], normalize=True)
    got = METHODS["ties"].fn(inp)
    # weighted trimmed: [3, 0, 0, 2] and [-2, 0.5, 0, 0]; mass signs: [+, +, +(0), +]
    # agreeing entries: [3 | w=1], [0.5 | w=0.5], [none], [2 | w=1]
    torch.testing.assert_close(got, torch.tensor([3.0, 1.0, 0.0, 2.0]))


def test_dare_reproduces_and_splits_by_rows_bit_for_bit() -> None:
    base, vs = _versions(shape=(300, 5000), dtype=torch.float32)  # several mask blocks
    kw = {"densities": [0.3, 0.5, 0.7], "seed_key": "0:w"}
    full = METHODS["dare_ties"].fn(_inputs(vs, base, **kw))
    again = METHODS["dare_ties"].fn(_inputs(vs, base, **kw))
    assert torch.equal(full, again)
    top = METHODS["dare_ties"].fn(_inputs([v[:123] for v in vs], base[:123], **kw))
    bottom = METHODS["dare_ties"].fn(
        _inputs([v[123:] for v in vs], base[123:], row_offset=123, **kw)
    )
    assert torch.equal(torch.cat([top, bottom]), full)
    other_seed = METHODS["dare_ties"].fn(
        _inputs(vs, base, densities=[0.3, 0.5, 0.7], seed_key="1:w")
    )
    assert not torch.equal(full, other_seed)


def test_dare_mask_density_and_rescale_keep_the_expected_delta() -> None:
    mask = dare_mask(torch.Size([1000, 1000]), 0.1, "k", 0)
    assert abs(mask.float().mean().item() - 0.1) < 0.005
    base, vs = _versions(n=1, shape=(500, 500), dtype=torch.float32)
    dropped = METHODS["dare_linear"].fn(
        _inputs(vs, base, weights=[1.0], densities=[0.5], seed_key="s")
    )
    # Rescaling by 1/density keeps the delta's sum in expectation.
    assert abs((dropped - base).sum() - (vs[0] - base).sum()) < 0.05 * (vs[0] - base).abs().sum()


def test_dare_linear_at_density_one_is_task_arithmetic() -> None:
    base, vs = _versions(dtype=torch.float32)
    a = METHODS["dare_linear"].fn(_inputs(vs, base, lambda_=0.7))
    b = METHODS["task_arithmetic"].fn(_inputs(vs, base, lambda_=0.7))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fisher_with_flat_fisher_is_the_normalised_average_and_weighs_by_fisher() -> None:
    _, vs = _versions(dtype=torch.float32)
    ones = [torch.ones_like(v) for v in vs]
    got = METHODS["fisher"].fn(_inputs(vs, None, weights=[1.0, 1.0, 2.0], fishers=ones))
    torch.testing.assert_close(got, (vs[0] + vs[1] + 2 * vs[2]) / 4, rtol=0, atol=1e-6)
    only_first = [
        torch.ones_like(vs[0]),
        torch.full_like(vs[1], 1e-6),
        torch.full_like(vs[2], 1e-6),
    ]
    got = METHODS["fisher"].fn(_inputs(vs, None, weights=[1.0, 1.0, 1.0], fishers=only_first))
    torch.testing.assert_close(got, vs[0], rtol=0, atol=1e-4)


def test_non_finite_input_is_detected() -> None:
    _, vs = _versions(dtype=torch.float32)
    vs[1][3, 4] = float("nan")
    with pytest.raises(NonFiniteError):
        METHODS["linear"].fn(_inputs(vs, None, normalize=True))


def test_mwa_weights() -> None:
    assert mwa_weights_from_values([2.0, 1.0, 0.5], "loss", 0.0) == pytest.approx([1 / 3] * 3)
    by_loss = mwa_weights_from_values([2.0, 1.0, 0.5], "loss", 1.0)
    assert by_loss == pytest.approx([0.5 / 3.5, 1 / 3.5, 2 / 3.5])
    by_step = mwa_weights_from_values([100, 200, 300], "step", 1.0)
    assert by_step == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert sum(mwa_weights_from_values([1e-3, 5.0], "loss", 50.0)) == pytest.approx(1.0)
    with pytest.raises(RecyclerError):
        mwa_weights_from_values([1.0, -1.0], "loss", 1.0)


def test_magnitude_trim_keeps_exactly_k_and_breaks_ties_by_index() -> None:
    tau = torch.tensor([1.0, -3.0, 2.0, -2.0, 2.0, 0.5])
    # k = 3: |-3| and two of the three 2s, the lowest indices first.
    assert magnitude_trim(tau, 0.5).tolist() == [0.0, -3.0, 2.0, -2.0, 0.0, 0.0]
    # k = ⌊0.6⌋ = 0, but a positive density keeps at least one entry (as mergekit 0.1.5).
    assert magnitude_trim(tau, 0.1).tolist() == [0.0, -3.0, 0.0, 0.0, 0.0, 0.0]
    assert torch.equal(magnitude_trim(tau, 1.0), tau)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(10_000, generator=g).to(torch.bfloat16).float()  # many ties
    trimmed = magnitude_trim(big, 0.3)
    assert int((trimmed != 0).sum()) == 3000
    assert (
        trimmed.abs().min() == 0 and (big.abs() > trimmed[trimmed != 0].abs().min()).sum() <= 3000
    )


def test_overflow_in_the_output_dtype_is_detected() -> None:
    # Finite in the fp32 accumulator, infinite once cast to fp16.
    xs = [torch.full((10,), 60000.0), torch.full((10,), 60000.0)]
    with pytest.raises(NonFiniteError):
        linear_combination(xs, [1.0, 1.0], torch.float16)
    assert torch.isfinite(linear_combination(xs, [1.0, 1.0], torch.float32)).all()


# ---- the methods beyond the linear family, read through their descriptions ------------


def _described(
    name: str,
    versions: list[torch.Tensor],
    base: torch.Tensor | None,
    row_offset: int = 0,
    seed_key: str = "0:w",
    **values: float | bool,
) -> MergeInputs:
    """Inputs as the engine builds them: every parameter at its default, required ones 0.3."""
    method = METHODS[name]
    n = len(versions)
    per_model = {
        p.name: [float(p.default if p.default is not None else 0.3)] * n
        for p in method.params
        if p.scope == "model"
    }
    if "weight" in per_model:
        per_model["weight"] = [0.5, 0.3, 0.2][:n]
    if "density" in per_model:
        per_model["density"] = [0.5, 0.6, 0.4][:n]
    scalars: dict[str, float | bool] = {
        p.name: (p.default if p.default is not None else 0.3)
        for p in method.params
        if p.scope != "model"
    }
    scalars.update(values)
    params = TensorParams(scalars, per_model)
    return MergeInputs(
        versions=versions,
        weights=params.weights or [1.0] * n,
        base=base,
        out_dtype=torch.float32,
        normalize=params.normalize,
        lambda_=params.lambda_,
        densities=per_model.get("density", [1.0] * n),
        seed_key=seed_key,
        row_offset=row_offset,
        params=params,
    )


def _fitting_inputs(name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """A base (where the method reads one) and as many models as the method takes."""
    method = METHODS[name]
    base, vs = _versions(n=3, shape=(300, 40), dtype=torch.float32)
    low, high = method.model_range(method.uses_base)
    n = min(3, high) if high is not None else 3
    return (base if method.uses_base else None), vs[: max(low, n)]


@pytest.mark.parametrize(
    "name", [n for n, m in METHODS.items() if m.row_splittable and not m.needs_fishers]
)
def test_row_splittable_methods_merge_row_blocks_bit_for_bit(name: str) -> None:
    """What the descriptions promise the shard plan: rows [a, b) merge on their own."""
    base, vs = _fitting_inputs(name)
    full = METHODS[name].fn(
        _described(name, vs, base, t=0.02) if name == "nearswap" else _described(name, vs, base)
    )
    cut = 123
    parts = [
        METHODS[name].fn(
            _described(
                name,
                [v[lo:hi] for v in vs],
                None if base is None else base[lo:hi],
                row_offset=lo,
                **({"t": 0.02} if name == "nearswap" else {}),
            )
        )
        for lo, hi in ((0, cut), (cut, 300))
    ]
    assert torch.equal(torch.cat(parts), full)


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.random])
def test_random_methods_reproduce_and_follow_the_seed(name: str) -> None:
    base, vs = _fitting_inputs(name)
    inp = _described(name, vs, base)
    a, b = METHODS[name].fn(inp), METHODS[name].fn(inp)
    assert torch.equal(a, b)
    other = MergeInputs(**{**inp.__dict__, "seed_key": "1:w"})
    assert not torch.equal(a, METHODS[name].fn(other))


def test_slerp_ends_and_middle() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    for t, want in ((0.0, a), (1.0, b), (0.5, (a + b) / 2**0.5)):
        got = METHODS["slerp"].fn(_described("slerp", [b], a, t=t))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_model_stock_of_equal_task_vectors_is_their_model() -> None:
    base, vs = _versions(n=1, dtype=torch.float32)
    got = METHODS["model_stock"].fn(_described("model_stock", [vs[0], vs[0].clone()], base))
    torch.testing.assert_close(got, vs[0], rtol=0, atol=1e-6)  # cos = 1: t = 1


def test_nearswap_takes_the_model_only_near_the_base() -> None:
    base = torch.zeros(3)
    model = torch.tensor([0.05, 0.2, 1.0])
    got = METHODS["nearswap"].fn(_described("nearswap", [model], base, t=0.1))
    torch.testing.assert_close(got, torch.tensor([0.05, 0.1, 0.1]))  # w = min(1, t / |Δ|)


def test_ram_averages_shared_changes_and_keeps_unique_ones() -> None:
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])
    got = METHODS["ram"].fn(_described("ram", [a, b], base))
    torch.testing.assert_close(got, torch.tensor([2.0, 1.0, 0.0]))
