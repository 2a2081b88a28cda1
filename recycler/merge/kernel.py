"""The fast kernel: Σ c_i x_i over tensors of any float dtypes, fp32 accumulation, one cast.

Most merges (linear, task arithmetic, weight schemes) are one linear combination
per tensor, so this loop decides how fast a merge runs. On the CPU it is bound by
memory bandwidth, and three things keep it there:

- it works in chunks whose fp32 accumulator stays in cache, so each input byte is
  read from memory once and each output byte written once;
- each input chunk is widened to fp32 with a plain copy first (PyTorch's fused
  mixed-dtype add is several times slower than copy + add);
- it runs the chunks on its own threads with single-threaded PyTorch ops. PyTorch's
  OpenMP parallelism spins at its barriers when the cores are shared, which on a
  busy two-core machine made these ops ten times slower; plain threads that each
  own a range of the tensor do not wait on each other.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# Elements per step: two fp32 buffers of this size per thread stay in cache.
CHUNK = 1 << 18
# Below this many elements a tensor is not worth spreading over threads.
_PARALLEL_MIN = 1 << 21


class NonFiniteError(ArithmeticError):
    """The merge of a tensor produced NaN or inf (a non-finite input, or an overflow)."""


_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _on_kernel_thread(flats: Sequence[torch.Tensor], coeffs: Sequence[float], out: torch.Tensor, start: int, end: int, step: int) -> None:
    # PyTorch sets a thread's OpenMP width lazily, from the process-wide default, at
    # the thread's first op; checked on every task so no first op can undo it.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    _combine_range(flats, coeffs, out, start, end, step)


def _workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_workers(), thread_name_prefix="recycler-kernel")
        return _pool


def _buffers(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (n, device)
    cached = getattr(_local, "buffers", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.empty(n, dtype=torch.float32, device=device), torch.empty(n, dtype=torch.float32, device=device))
        _local.buffers = cached
    return cached[1], cached[2]


def _combine_range(flats: Sequence[torch.Tensor], coeffs: Sequence[float], out: torch.Tensor, start: int, end: int, step: int) -> None:
    acc_buf, tmp_buf = _buffers(min(step, end - start), out.device)
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
            raise NonFiniteError


def linear_combination(tensors: Sequence[torch.Tensor], coeffs: Sequence[float], out_dtype: torch.dtype) -> torch.Tensor:
    """Σ c_i x_i in fp32, returned in `out_dtype`; inputs may mix dtypes and must share a shape."""
    shape, device = tensors[0].shape, tensors[0].device
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    out = torch.empty(n, dtype=out_dtype, device=device)
    if n == 0:
        return out.view(shape)
    if device.type != "cpu":
        # A GPU has the bandwidth to do it in one pass of fused-enough ops.
        _combine_range(flats, coeffs, out, 0, n, n)
        return out.view(shape)
    # Even a small tensor goes to the kernel threads: on this thread PyTorch's ops
    # would be multi-threaded again.
    workers = _workers() if n >= _PARALLEL_MIN else 1
    per_worker = -(-n // workers)
    per_worker = -(-per_worker // CHUNK) * CHUNK  # whole chunks, so every chunk is full but the last
    threads = torch.get_num_threads()
    futures = [
        _executor().submit(_on_kernel_thread, flats, coeffs, out, lo, min(n, lo + per_worker), CHUNK)
        for lo in range(0, n, per_worker)
    ]
    for f in futures:
        f.result()
    if torch.get_num_threads() != threads:
        # set_num_threads on a kernel thread also moved the process-wide default.
        torch.set_num_threads(threads)
    return out.view(shape)
