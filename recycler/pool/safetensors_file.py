"""One safetensors file: its header parsed and checked without reading tensor data,
and tensors read lazily as zero-copy views of a memory map.

The header is parsed here rather than through `safetensors.safe_open` so that a
truncated file or a corrupt header becomes one clear error naming the file and the
tensor, and so that the merge can release each tensor's pages once it is merged
(peak memory stays near one tensor per checkpoint, not the whole pool).

Dtypes are kept as safetensors' codes ("BF16", "F32", ...) and PyTorch is imported
only to make a tensor: opening and checking a pool, and a merge that goes file to
file, run without PyTorch's import (about 2 s, most of a small merge's time).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recycler.errors import RecyclerError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (PyTorch's name for it, bytes per element, floating point).
_DTYPES: dict[str, tuple[str, int, bool]] = {
    "F64": ("float64", 8, True),
    "F32": ("float32", 4, True),
    "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True),
    "F8_E4M3": ("float8_e4m3fn", 1, True),
    "F8_E5M2": ("float8_e5m2", 1, True),
    "I64": ("int64", 8, False),
    "I32": ("int32", 4, False),
    "I16": ("int16", 2, False),
    "I8": ("int8", 1, False),
    "U8": ("uint8", 1, False),
    "BOOL": ("bool", 1, False),
}
_CODE_FROM_NAME = {name: code for code, (name, _, _) in _DTYPES.items()}


def dtype_name(code: str) -> str:
    """PyTorch's (and config.json's) name of a safetensors dtype code: "BF16" -> "bfloat16"."""
    return _DTYPES[code][0]


def itemsize(code: str) -> int:
    return _DTYPES[code][1]


def torch_dtype(code: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, dtype_name(code))
    assert isinstance(dtype, torch.dtype)
    return dtype


def code_of(dtype: torch.dtype) -> str:
    """The safetensors code of a PyTorch dtype."""
    return _CODE_FROM_NAME[str(dtype).removeprefix("torch.")]


# A header larger than this is not a real safetensors header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000
_PAGE = mmap.PAGESIZE
# madvise(2) advice that maps a range's pages in one call (Linux 5.14+); Python 3.11's
# mmap module does not name it.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor is, without its data."""

    shape: tuple[int, ...]
    code: str  # the safetensors dtype code

    @classmethod
    def of(cls, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> TensorInfo:
        return cls(tuple(shape), code_of(dtype))

    @property
    def dtype(self) -> torch.dtype:
        """As a PyTorch dtype (imports PyTorch)."""
        return torch_dtype(self.code)

    @property
    def itemsize(self) -> int:
        return itemsize(self.code)

    @property
    def is_floating_point(self) -> bool:
        return _DTYPES[self.code][2]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class TensorLocation:
    info: TensorInfo
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """A parsed safetensors header and, once a tensor is read, a private memory map."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors, self.metadata = _parse_header(path)
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def read(self, name: str) -> torch.Tensor:
        """A zero-copy view of one tensor; valid until `release` drops its pages."""
        import torch

        loc = self.tensors[name]
        if loc.info.numel == 0:
            return torch.empty(loc.info.shape, dtype=loc.info.dtype)
        flat = torch.frombuffer(
            self._mapped(), dtype=loc.info.dtype, count=loc.info.numel, offset=loc.begin
        )
        return flat.view(loc.info.shape)

    def _mapped(self) -> mmap.mmap:
        with self._lock:
            if self._map is None:
                with open(self.path, "rb") as f:
                    # ACCESS_COPY (a private mapping) gives a writable buffer, which
                    # torch.frombuffer wants; nothing is ever written back to the file.
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._map

    def prefetch(self, name: str) -> None:
        """Map a tensor's pages ahead of its use, in one call rather than a fault per page.

        Run on a reader thread while the previous tensor merges. Where the kernel
        has no MADV_POPULATE_READ (before Linux 5.14), it only starts the read-ahead.
        """
        if self.tensors[name].info.numel == 0:
            return
        self._mapped()
        try:
            self._advise(name, _MADV_POPULATE_READ)
        except OSError:
            self._advise(name, mmap.MADV_WILLNEED)

    def release(self, name: str) -> None:
        """Drop a merged tensor's pages from this process (they stay in the page cache)."""
        if self._map is not None and self.tensors[name].info.numel:
            self._advise(name, mmap.MADV_DONTNEED)

    def _advise(self, name: str, advice: int) -> None:
        assert self._map is not None
        loc = self.tensors[name]
        start = loc.begin // _PAGE * _PAGE
        length = loc.end - start
        if length > 0:
            self._map.madvise(advice, start, length)

    def close(self) -> None:
        if self._map is not None:
            # A tensor view may still point into the map; the GC closes it later then.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None


def _parse_header(path: Path) -> tuple[dict[str, TensorLocation], dict[str, str]]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise RecyclerError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise RecyclerError(
                    f"{path}: corrupt safetensors header (declares {header_len} header bytes in a {size}-byte file)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise RecyclerError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecyclerError(f"{path}: corrupt safetensors header ({exc})") from None

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorLocation] = {}
    for name, entry in header.items():
        try:
            code = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise RecyclerError(f"{path}: tensor {name}: corrupt header entry {entry!r}") from None
        if code not in _DTYPES:
            raise RecyclerError(
                f"{path}: tensor {name}: unknown dtype {code!r} (known: {', '.join(_DTYPES)})"
            )
        info = TensorInfo(shape, code)
        if any(d < 0 for d in shape) or end - begin != info.nbytes or begin < 0:
            raise RecyclerError(
                f"{path}: tensor {name}: header says {end - begin} bytes for shape {list(shape)} {entry['dtype']}"
            )
        if data_start + end > size:
            raise RecyclerError(
                f"{path}: tensor {name}: file is truncated (data ends at byte {data_start + end}, file has {size})"
            )
        tensors[name] = TensorLocation(info, data_start + begin, data_start + end)
    return tensors, {str(k): str(v) for k, v in metadata.items()}
