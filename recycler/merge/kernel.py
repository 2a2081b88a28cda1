"""The fast kernel: Σ c_i x_i over tensors of any float dtypes, fp32 accumulation, one cast.

Most merges (linear, task arithmetic, weight schemes) are one linear combination
per tensor, so this loop decides how fast a merge runs. On the CPU it runs in C
(`_fused.c`): each element is loaded once, combined in registers and stored once,
and the work is cut into ranges that the kernel threads take in turn, so a core
slowed by other work on a shared machine holds no one up. Two entry points:

- `linear_combination`: tensors in memory (a search trial's merge, a Ray shard);
- `combine_files`: stored tensors straight from their files to the output file
  (`recycler merge`), with no tensor ever mapped or allocated.

`gram` and `gram_files` give tensors' inner products (fp64, the same bits in memory and
from files), which a merge whose coefficients depend on them (SLERP's angle) needs
before combining.

Where the C kernel cannot serve (a GPU, float64 or float8 inputs, or an install
without a C compiler) the same sum runs as chunked PyTorch ops, which on the CPU
are several times slower: each chunk is widened to fp32 with a copy, added, and
cast, each a pass with PyTorch's per-op overhead.

PyTorch is imported where a tensor is touched, not with the module: the file-to-file
path runs without it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from recycler.pool.safetensors_file import code_of

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> the C kernel's code, for the dtypes it takes; empty where
# it was not built.
_FUSED_CODES: dict[str, int] = {}
try:
    import recycler.merge._fused as _fused
except ImportError:  # built without a C compiler (setup.py marks the extension optional)
    pass
else:
    _FUSED_CODES = {"F32": _fused.F32, "BF16": _fused.BF16}
    if _fused.HAVE_F16:
        _FUSED_CODES["F16"] = _fused.F16

# Elements per task of the kernel threads: small enough to balance two busy cores,
# large enough that handing a task over (~20 µs) costs under 1 %.
TASK = 1 << 20
# Elements per step of the PyTorch fallback: two fp32 buffers of this size stay in cache.
CHUNK = 1 << 18


class NonFiniteError(ArithmeticError):
    """The merge of a tensor produced NaN or inf (a non-finite input, or an overflow)."""


def fused_gram() -> bool:
    """Whether the C kernel has `gram_files` (a kernel built before it lacks it)."""
    return bool(_FUSED_CODES) and hasattr(_fused, "gram_files")


def fused_dtypes(codes: Sequence[str]) -> bool:
    """Whether the C kernel takes these dtypes (safetensors codes; inputs and output alike)."""
    return bool(_FUSED_CODES) and all(c in _FUSED_CODES for c in codes)


_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_workers(), thread_name_prefix="recycler-kernel")
        return _pool


class Ranges:
    """The ranges of one tensor, submitted to the kernel threads."""

    def __init__(self, n: int, task: Callable[[int, int], bool]) -> None:
        self._futures = [
            _executor().submit(task, lo, min(n, lo + TASK)) for lo in range(0, n, TASK)
        ]

    def wait(self) -> bool:
        """True if every range's result was finite; re-raises a range's error."""
        # Every range is waited for, failed or not, so none still writes once this returns.
        errors = [f.exception() for f in self._futures]
        for error in errors:
            if error is not None:
                raise error
        return all(f.result() for f in self._futures)

    def cancel(self) -> None:
        """Drop the ranges not yet started and wait for the running ones."""
        for f in self._futures:
            f.cancel()
        wait(self._futures)


def _run_ranges(n: int, task: Callable[[int, int], bool], *, small_here: bool = True) -> bool:
    """`task(lo, hi)` over [0, n) in TASK-sized ranges on the kernel threads; True if all were.

    A tensor of one range runs on the calling thread unless `small_here` is False.
    """
    if n <= TASK and small_here:
        return task(0, n)
    return Ranges(n, task).wait()


def linear_combination(
    tensors: Sequence[torch.Tensor], coeffs: Sequence[float], out_dtype: torch.dtype
) -> torch.Tensor:
    """Σ c_i x_i in fp32, returned in `out_dtype`; inputs may mix dtypes and must share a shape."""
    import torch

    shape, device = tensors[0].shape, tensors[0].device
    flats = [t.reshape(-1).contiguous() for t in tensors]
    n = flats[0].numel()
    out = torch.empty(n, dtype=out_dtype, device=device)
    if n == 0:
        return out.view(shape)
    if device.type == "cpu" and fused_dtypes(
        [code_of(out_dtype), *(code_of(f.dtype) for f in flats)]
    ):
        addrs = [f.data_ptr() for f in flats]
        codes = [_FUSED_CODES[code_of(f.dtype)] for f in flats]
        out_addr, out_code = out.data_ptr(), _FUSED_CODES[code_of(out_dtype)]
        finite = _run_ranges(
            n, lambda lo, hi: _fused.combine(out_addr, out_code, addrs, codes, coeffs, lo, hi)
        )
    else:
        finite = _torch_combine(flats, coeffs, out)
    if not finite:
        raise NonFiniteError
    return out.view(shape)


def combine_files(
    out_fd: int,
    out_offset: int,
    out_code: str,
    inputs: Sequence[tuple[int, int, str]],
    coeffs: Sequence[float],
    numel: int,
) -> Ranges:
    """Start writing Σ c_i x_i for `numel` elements at `out_offset` of `out_fd`, each x_i
    read at (fd, offset, dtype code) of `inputs`. Needs the C kernel (`fused_dtypes`).

    Returns at once, so the caller can queue the next tensors behind this one and keep
    every kernel thread busy across tensor boundaries. `wait()` returns False for a
    non-finite result and raises OSError whose `filename` is the failing input's
    index (-1 for the output).
    """
    fds = [fd for fd, _, _ in inputs]
    offsets = [offset for _, offset, _ in inputs]
    codes = [_FUSED_CODES[code] for _, _, code in inputs]
    out_kernel_code = _FUSED_CODES[out_code]

    def task(lo: int, hi: int) -> bool:
        return _fused.combine_files(
            out_fd,
            out_offset,
            out_kernel_code,
            fds,
            offsets,
            codes,
            coeffs,
            lo,
            hi,
            _scratch(len(inputs)),
        )

    return Ranges(numel, task)


def gram(tensors: Sequence[torch.Tensor]) -> list[list[float]] | None:
    """The inner products ⟨x_a, x_b⟩ of the (flattened) `tensors` in fp64, as a symmetric
    matrix: the same bits as `gram_files` over the same values. None where the C kernel
    cannot serve (see `fused_gram`; a GPU, other dtypes, more than 4 tensors)."""
    flats = [t.reshape(-1).contiguous() for t in tensors]
    if not (
        fused_gram()
        and len(flats) <= 4
        and all(f.device.type == "cpu" for f in flats)
        and fused_dtypes([code_of(f.dtype) for f in flats])
    ):
        return None
    addrs = [f.data_ptr() for f in flats]
    codes = [_FUSED_CODES[code_of(f.dtype)] for f in flats]
    sums = _gram_ranges(flats[0].numel(), lambda lo, hi: _fused.gram(addrs, codes, lo, hi))
    del flats  # kept alive until every range was summed
    return _symmetric(sums, len(tensors))


def gram_files(inputs: Sequence[tuple[int, int, str]], numel: int) -> list[list[float]]:
    """`gram` of `numel` elements of each of `inputs` ((fd, offset, dtype code), at most 4),
    read from the files like `combine_files`; needs `fused_gram` and `fused_dtypes`.
    OSError as `combine_files` raises it."""
    fds = [fd for fd, _, _ in inputs]
    offsets = [offset for _, offset, _ in inputs]
    codes = [_FUSED_CODES[code] for _, _, code in inputs]
    sums = _gram_ranges(
        numel, lambda lo, hi: _fused.gram_files(fds, offsets, codes, lo, hi, _scratch(len(fds)))
    )
    return _symmetric(sums, len(inputs))


def _gram_ranges(n: int, task: Callable[[int, int], tuple[float, ...]]) -> list[float]:
    """`task`'s fp64 sums over [0, n) in TASK-sized ranges on the kernel threads, added in
    the ranges' order: the result does not depend on which thread took which."""
    if n <= TASK:
        return list(task(0, n))
    futures = [_executor().submit(task, lo, min(n, lo + TASK)) for lo in range(0, n, TASK)]
    errors = [f.exception() for f in futures]  # every range waited for before raising
    for error in errors:
        if error is not None:
            raise error
    totals = list(futures[0].result())
    for f in futures[1:]:
        totals = [t + s for t, s in zip(totals, f.result())]
    return totals


def _symmetric(sums: Sequence[float], k: int) -> list[list[float]]:
    """The k × k matrix of the kernel's sums, given for a <= b row by row."""
    matrix = [[0.0] * k for _ in range(k)]
    pairs = [(a, b) for a in range(k) for b in range(a, k)]
    for (a, b), total in zip(pairs, sums):
        matrix[a][b] = matrix[b][a] = total
    return matrix


def _scratch(k: int) -> bytearray:
    """This thread's buffer for `combine_files`: a chunk of each input and of the output."""
    need = (k + 1) * _fused.FILE_STEP * 4
    buf: bytearray | None = getattr(_local, "scratch", None)
    if buf is None or len(buf) < need:
        buf = _local.scratch = bytearray(need)
    return buf


# ------------------------------------------------------------------ PyTorch fallback


def _torch_combine(
    flats: Sequence[torch.Tensor], coeffs: Sequence[float], out: torch.Tensor
) -> bool:
    import torch

    n = out.numel()
    if out.device.type != "cpu":
        # A GPU has the bandwidth to do it in one pass of fused-enough ops.
        return _combine_range(flats, coeffs, out, 0, n)
    # Even a small tensor goes to the kernel threads: on this thread PyTorch's ops
    # would be multi-threaded, and PyTorch's OpenMP threads spin at their barriers
    # when the cores are shared (ten times slower on a busy two-core machine).
    threads = torch.get_num_threads()
    try:
        return _run_ranges(
            n, lambda lo, hi: _on_kernel_thread(flats, coeffs, out, lo, hi), small_here=False
        )
    finally:
        if torch.get_num_threads() != threads:
            # set_num_threads on a kernel thread also moved the process-wide default.
            torch.set_num_threads(threads)


def _on_kernel_thread(
    flats: Sequence[torch.Tensor], coeffs: Sequence[float], out: torch.Tensor, start: int, end: int
) -> bool:
    # PyTorch sets a thread's OpenMP width lazily, from the process-wide default, at
    # the thread's first op; checked on every task so no first op can undo it.
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return _combine_range(flats, coeffs, out, start, end)


def _buffers(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    key = (n, device)
    cached = getattr(_local, "buffers", None)
    if cached is None or cached[0] != key:
        cached = (
            key,
            torch.empty(n, dtype=torch.float32, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
        )
        _local.buffers = cached
    return cached[1], cached[2]


def _combine_range(
    flats: Sequence[torch.Tensor], coeffs: Sequence[float], out: torch.Tensor, start: int, end: int
) -> bool:
    import torch

    step = min(CHUNK, end - start) if out.device.type == "cpu" else end - start
    acc_buf, tmp_buf = _buffers(step, out.device)
    for lo in range(start, end, step):
        hi = min(end, lo + step)
        acc, tmp = acc_buf[: hi - lo], tmp_buf[: hi - lo]
        acc.copy_(flats[0][lo:hi])
        acc.mul_(coeffs[0])
        for x, c in zip(flats[1:], coeffs[1:]):
            if x.dtype == torch.float32:
                acc.add_(x[lo:hi], alpha=c)
            else:
                tmp.copy_(x[lo:hi])
                acc.add_(tmp, alpha=c)
        chunk = out[lo:hi]
        chunk.copy_(acc)
        # Tested after the cast, which can overflow (fp16 tops out at 65504). A NaN or
        # inf anywhere makes the sum non-finite: one cheap reduction while the chunk is
        # in cache (the exact test runs only if it fires).
        if not torch.isfinite(chunk.sum()) and not bool(torch.isfinite(chunk).all()):
            return False
    return True
