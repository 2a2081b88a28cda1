"""The merge engine: a pool and a recipe in, merged tensors out, one tensor at a time.

Two paths, the same bits:

- `iter_merged` yields merged tensors. Only one tensor's versions are in memory at
  once (plus the next one's being read ahead), so peak memory stays near (number of
  checkpoints × largest tensor), never the whole pool. `merge_tensor` serves it and
  `resident.ResidentPieces`, the in-memory merge of a search's workers.
- `FileMerger` writes a tensor's merge straight from the input files into the output
  file, where the method is one linear combination of stored tensors (linear, task
  arithmetic; SLERP too, its coefficients from the inner products that the kernel reads
  from the files first): the C kernel reads, combines and writes chunks on its threads,
  and no tensor is ever mapped or allocated. The export uses it on the CPU wherever it can.

PyTorch is imported inside the functions that make tensors, not with the module: a
file-to-file `recycler merge` runs without it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from recycler.errors import RecyclerError
from recycler.merge.description import MergeInputs, UndefinedMerge
from recycler.merge.kernel import (
    NonFiniteError,
    Ranges,
    combine_files,
    fused_dtypes,
    fused_gram,
    gram_files,
)
from recycler.merge.methods import METHODS
from recycler.merge.recipe import Recipe
from recycler.pool import Checkpoint, Pool, StoredTensor
from recycler.pool.safetensors_file import itemsize

if TYPE_CHECKING:
    import torch

    from recycler.merge.fisher import FisherFile


@dataclass
class MergeStats:
    """What a merge moved, for benchmarks and trial timings."""

    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    per_tensor: dict[str, float] = field(default_factory=dict)


def merge_tensor(
    recipe: Recipe,
    name: str,
    versions: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    pool: Pool,
    fishers: Sequence[torch.Tensor] = (),
    row_offset: int = 0,
) -> torch.Tensor:
    """Merge one tensor (or a block of its rows starting at `row_offset`) as the recipe says.

    `versions` (and `base`) are `pool`'s, in its order. A non-finite result is a
    RecyclerError naming the input that holds NaN or inf, or else the overflow.
    """
    import torch

    out_dtype = recipe.torch_dtype
    if not versions[0].dtype.is_floating_point:
        # Integer buffers (position ids, masks) are not merged: the reference's copy is kept.
        return (base if base is not None else versions[0]).clone()
    method = METHODS[recipe.merge_method]
    params = recipe.tensor_params(name, pool.n_layers)
    ones = [1.0] * len(versions)
    inputs = MergeInputs(
        versions=versions,
        weights=params.per_model.get("weight", ones),
        base=base,
        out_dtype=out_dtype,
        normalize=params.normalize,
        lambda_=params.lambda_,
        densities=params.per_model.get("density", ones),
        seed_key=f"{recipe.random_seed}:{name}",
        row_offset=row_offset,
        fishers=fishers,
        params=params,
    )
    try:
        merged = method.fn(inputs)
        if not method.checks_finite and not bool(torch.isfinite(merged).all()):
            raise NonFiniteError(name)
    except ZeroDivisionError:
        raise RecyclerError(_zero_weights(name)) from None
    except NonFiniteError:
        raise RecyclerError(_non_finite_culprit(pool, name, versions, base)) from None
    except UndefinedMerge as exc:
        raise RecyclerError(f"tensor {name}: {exc}") from None
    return merged


def iter_merged(
    pool: Pool,
    recipe: Recipe,
    device: str | torch.device = "cpu",
    stats: MergeStats | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor in the recipe's dtype), in the pool's tensor order."""
    method = METHODS[recipe.merge_method]
    check_fits(pool, recipe)
    fisher_sources = None
    if method.needs_fishers:
        # fisher.py imports PyTorch with the module: only a fisher merge needs it.
        from recycler.merge.fisher import open_fishers

        fisher_sources = open_fishers(pool)
    stats = stats if stats is not None else MergeStats()
    names = list(names) if names is not None else pool.tensor_names
    sources = list(pool.checkpoints)
    use_base = method.uses_base and pool.base is not None
    if use_base:
        assert pool.base is not None
        sources.append(pool.base)
    # One reader thread maps the next tensor of every source while this one merges.
    reader = ThreadPoolExecutor(1, thread_name_prefix="recycler-reader")
    try:
        ahead = reader.submit(_prefetch, sources, names[0]) if names else None
        for i, name in enumerate(names):
            start = time.perf_counter()
            if ahead is not None:
                ahead.result()
            ahead = reader.submit(_prefetch, sources, names[i + 1]) if i + 1 < len(names) else None
            merged = _merge_one(
                pool, recipe, name, sources, use_base, fisher_sources, device, stats
            )
            elapsed = time.perf_counter() - start
            stats.seconds += elapsed
            stats.per_tensor[name] = elapsed
            yield name, merged
    finally:
        reader.shutdown(wait=True, cancel_futures=True)


def _prefetch(sources: Sequence[Checkpoint], name: str) -> None:
    for ckpt in sources:
        ckpt.prefetch(name)


def _merge_one(
    pool: Pool,
    recipe: Recipe,
    name: str,
    sources: Sequence[Checkpoint],
    use_base: bool,
    fisher_sources: Sequence[FisherFile] | None,
    device: str | torch.device,
    stats: MergeStats,
) -> torch.Tensor:
    tensors = [ckpt.read(name, device) for ckpt in sources]
    versions, base = (tensors[:-1], tensors[-1]) if use_base else (tensors, None)
    fishers = [f.read(name, device) for f in fisher_sources] if fisher_sources is not None else []
    merged = merge_tensor(recipe, name, versions, base, pool=pool, fishers=fishers)
    stats.bytes_read += sum(t.numel() * t.element_size() for t in tensors)
    stats.bytes_written += merged.numel() * merged.element_size()
    stats.tensors += 1
    del tensors, versions, base
    for ckpt in sources:
        ckpt.release(name)
    return merged


def merge_state_dict(
    pool: Pool, recipe: Recipe, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The whole merged model in memory (a search trial's merge; nothing touches the disk)."""
    return dict(iter_merged(pool, recipe, device))


def check_fits(pool: Pool, recipe: Recipe) -> None:
    """RecyclerError unless the recipe lists the pool's models, has the base it needs and
    as many models as the method takes."""
    if len(recipe.models) != len(pool.checkpoints):
        raise RecyclerError(
            f"the recipe lists {len(recipe.models)} models but the pool has {len(pool.checkpoints)}"
        )
    method = METHODS[recipe.merge_method]
    if method.needs_base and pool.base is None:
        raise RecyclerError(f"{recipe.merge_method} needs a base model")
    with_base = method.uses_base and pool.base is not None
    if (why := method.count_error(len(pool.checkpoints), with_base)) is not None:
        raise RecyclerError(why)


def _zero_weights(name: str) -> str:
    return f"tensor {name}: the weights sum to zero, which normalize cannot divide by"


@dataclass(frozen=True)
class StoredTerms:
    """A tensor's merge as Σ c_i x_i over stored tensors (the base first, where it has a term)."""

    inputs: list[StoredTensor]
    coeffs: list[float]


@dataclass(frozen=True)
class FileJob:
    """One tensor for `FileMerger.merge`: its terms and where its merge goes."""

    name: str
    terms: StoredTerms
    out_fd: int
    out_offset: int
    out_path: Path

    @property
    def numel(self) -> int:
        return self.terms.inputs[0].info.numel


class FileMerger:
    """Merges tensors from the pool's files straight into an output file (see the module doc)."""

    def __init__(self, pool: Pool, recipe: Recipe) -> None:
        check_fits(pool, recipe)
        self._pool = pool
        self._recipe = recipe
        self._n_layers = pool.n_layers
        self._fds: dict[Path, int] = {}

    def plan(self, name: str) -> StoredTerms | None:
        """`name`'s merge as stored terms, or None where it goes through `iter_merged`."""
        recipe, pool = self._recipe, self._pool
        method = METHODS[recipe.merge_method]
        if method.terms is None:
            return self._plan_gram(name)
        try:
            terms = method.terms(recipe.tensor_params(name, self._n_layers))
        except ZeroDivisionError:
            raise RecyclerError(_zero_weights(name)) from None
        sources = list(pool.checkpoints)
        coeffs = list(terms.versions)
        if terms.base is not None:
            assert pool.base is not None  # check_fits: a method with a base term needs one
            sources.insert(0, pool.base)
            coeffs.insert(0, terms.base)
        inputs = self._stored(name, sources)
        return StoredTerms(inputs, coeffs) if inputs is not None else None

    def _plan_gram(self, name: str) -> StoredTerms | None:
        """The terms of a method whose coefficients need the inputs' inner products."""
        recipe, pool = self._recipe, self._pool
        method = METHODS[recipe.merge_method]
        if method.gram_terms is None or not fused_gram():
            return None
        with_base = method.uses_base and pool.base is not None
        sources = [*([pool.base] if pool.base is not None and with_base else []), *pool.checkpoints]
        inputs = self._stored(name, sources)
        if inputs is None:
            return None
        terms = method.gram_terms(
            recipe.tensor_params(name, self._n_layers), self._gram(name, inputs), with_base
        )
        coeffs = [*([] if terms.base is None else [terms.base]), *terms.versions]
        return StoredTerms(inputs, coeffs)

    def _stored(self, name: str, sources: Sequence[Checkpoint]) -> list[StoredTensor] | None:
        """`name` in each of `sources`, or None unless all hold it in dtypes the kernel takes."""
        stored = [c.locate(name) for c in sources]
        inputs = [s for s in stored if s is not None]
        if len(inputs) < len(stored) or not fused_dtypes(
            [self._recipe.out_code, *(s.info.code for s in inputs)]
        ):
            return None
        return inputs

    def _gram(self, name: str, inputs: Sequence[StoredTensor]) -> list[list[float]]:
        try:
            return gram_files(
                [(self._fd(s.path), s.offset, s.info.code) for s in inputs], inputs[0].info.numel
            )
        except OSError as exc:
            index = exc.filename if isinstance(exc.filename, int) else 0
            raise RecyclerError(
                f"{inputs[index].path}: tensor {name}: cannot read: {exc.strerror or exc}"
            ) from None

    def merge(self, jobs: Sequence[FileJob], stats: MergeStats) -> None:
        """Write every job's merge into its slot; all are queued at once, so the kernel
        threads never wait at a tensor's end for the next to be handed out."""
        started = time.perf_counter()
        out_code = self._recipe.out_code
        pending = [
            combine_files(
                job.out_fd,
                job.out_offset,
                out_code,
                [(self._fd(s.path), s.offset, s.info.code) for s in job.terms.inputs],
                job.terms.coeffs,
                job.numel,
            )
            for job in jobs
        ]
        try:
            for job, ranges in zip(jobs, pending):
                self._wait(job, ranges)
                done = time.perf_counter()
                stats.per_tensor[job.name] = (
                    done - started
                )  # time since the previous tensor was done
                started = done
                stats.bytes_read += sum(s.info.nbytes for s in job.terms.inputs)
                stats.bytes_written += job.numel * itemsize(out_code)
                stats.tensors += 1
        finally:
            for ranges in pending:
                ranges.cancel()

    def _wait(self, job: FileJob, ranges: Ranges) -> None:
        try:
            finite = ranges.wait()
        except OSError as exc:
            index = exc.filename if isinstance(exc.filename, int) else -1
            where = (
                f"{job.terms.inputs[index].path}: tensor {job.name}: cannot read"
                if index >= 0
                else f"{job.out_path}: cannot write"
            )
            raise RecyclerError(f"{where}: {exc.strerror or exc}") from None
        if not finite:
            versions = [c.read(job.name) for c in self._pool.checkpoints]
            base = self._pool.base.read(job.name) if self._pool.base is not None else None
            raise RecyclerError(_non_finite_culprit(self._pool, job.name, versions, base))

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise RecyclerError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _non_finite_culprit(
    pool: Pool, name: str, versions: Sequence[torch.Tensor], base: torch.Tensor | None
) -> str:
    import torch

    for ckpt, v in zip(pool.checkpoints, versions):
        if not bool(torch.isfinite(v).all()):
            return f"{ckpt.path}: tensor {name}: has non-finite values (NaN or inf)"
    if base is not None and pool.base is not None and not bool(torch.isfinite(base).all()):
        return f"{pool.base.path}: tensor {name}: has non-finite values (NaN or inf)"
    return (
        f"tensor {name}: the merge overflowed to non-finite values (check the weights and lambda)"
    )
