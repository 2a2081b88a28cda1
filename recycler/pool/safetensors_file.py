"""One safetensors file: its header parsed and checked without reading tensor data,
and tensors read lazily as zero-copy views of a memory map.

The header is parsed here rather than through `safetensors.safe_open` so that a
truncated file or a corrupt header becomes one clear error naming the file and the
tensor, and so that the merge can release each tensor's pages once it is merged
(peak memory stays near one tensor per checkpoint, not the whole pool).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from recycler.errors import RecyclerError

# safetensors dtype codes ↔ torch dtypes.
DTYPE_FROM_CODE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODE_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_CODE.items()}

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
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


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
        loc = self.tensors[name]
        if loc.info.numel == 0:
            return torch.empty(loc.info.shape, dtype=loc.info.dtype)
        flat = torch.frombuffer(self._mapped(), dtype=loc.info.dtype, count=loc.info.numel, offset=loc.begin)
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
            dtype = DTYPE_FROM_CODE[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise RecyclerError(f"{path}: tensor {name}: corrupt header entry {entry!r}") from None
        info = TensorInfo(shape, dtype)
        if any(d < 0 for d in shape) or end - begin != info.nbytes or begin < 0:
            raise RecyclerError(f"{path}: tensor {name}: header says {end - begin} bytes for shape {list(shape)} {entry['dtype']}")
        if data_start + end > size:
            raise RecyclerError(
                f"{path}: tensor {name}: file is truncated (data ends at byte {data_start + end}, file has {size})"
            )
        tensors[name] = TensorLocation(info, data_start + begin, data_start + end)
    return tensors, {str(k): str(v) for k, v in metadata.items()}
