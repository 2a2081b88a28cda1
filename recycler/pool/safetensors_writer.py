"""Writing safetensors shards: the header of each planned up front (every shape and dtype
is known before a byte is merged), each file created at its full size, and every tensor
written at its own offset, in any order, from any thread.

PyTorch is imported only to write a tensor that was merged by PyTorch: a merge that goes
file to file (the C kernel writes into `ShardFiles.slot`) runs without it.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recycler.errors import RecyclerError
from recycler.pool.safetensors_file import TensorInfo

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ShardLayout:
    filename: str
    names: list[str]
    header: bytes
    nbytes: int
    tensor_nbytes: list[int]


def plan_output_files(infos: dict[str, TensorInfo], max_shard_bytes: int) -> list[ShardLayout]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its
    own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, info in infos.items():
        if groups[-1] and size + info.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += info.nbytes
    shards = []
    for i, names in enumerate(groups):
        filename = (
            "model.safetensors"
            if len(groups) == 1
            else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            info = infos[name]
            header[name] = {
                "dtype": info.code,
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keeps tensor data 8-byte aligned
        shards.append(
            ShardLayout(
                filename,
                names,
                len(raw).to_bytes(8, "little") + raw,
                offset,
                [infos[n].nbytes for n in names],
            )
        )
    return shards


class ShardFiles:
    """The output shards, created at their full size with their headers; each tensor
    is written at its planned offset, in any order."""

    def __init__(self, directory: Path, shards: list[ShardLayout]) -> None:
        self._slots: dict[str, tuple[int, int, int, Path]] = {}  # name -> fd, offset, bytes, path
        self._fds: list[int] = []
        self._unwritten: set[str] = set()
        try:
            for shard in shards:
                path = directory / shard.filename
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    self._fds.append(fd)
                    os.ftruncate(fd, len(shard.header) + shard.nbytes)
                except OSError as exc:
                    raise RecyclerError(f"{path}: cannot write: {exc.strerror or exc}") from None
                self._pwrite(fd, shard.header, 0, path)
                offset = len(shard.header)
                for name, nbytes in zip(shard.names, shard.tensor_nbytes):
                    self._slots[name] = (fd, offset, nbytes, path)
                    offset += nbytes
                self._unwritten.update(shard.names)
        except BaseException:
            self.close()
            raise

    def slot(self, name: str) -> tuple[int, int, Path]:
        """(fd, offset, path) where `name`'s bytes go; the caller writes them there."""
        fd, offset, _, path = self._slots[name]
        self._unwritten.discard(name)
        return fd, offset, path

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        flat = tensor.detach().reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        nbytes = self._slots[name][2]
        if flat.numel() * flat.element_size() != nbytes:
            raise RuntimeError(
                f"tensor {name}: {flat.numel() * flat.element_size()} bytes, planned {nbytes}"
            )
        fd, offset, path = self.slot(name)
        if nbytes:
            self._pwrite(fd, flat.contiguous().view(torch.uint8).numpy().data, offset, path)

    def check_complete(self) -> None:
        if self._unwritten:
            raise RuntimeError(
                f"{len(self._unwritten)} tensors were never written, e.g. {min(self._unwritten)}"
            )

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    @staticmethod
    def _pwrite(fd: int, data: bytes | memoryview, offset: int, path: Path) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise RecyclerError(f"{path}: cannot write: {exc.strerror or exc}") from None


class WriterThread:
    """Writes merged tensors to their slots on a thread of its own."""

    def __init__(self, files: ShardFiles) -> None:
        self._files = files
        self._queue: queue.Queue[tuple[str, torch.Tensor] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="recycler-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put((name, tensor), timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        # Drain so the thread is not left blocked, then stop it.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                self._files.write(*item)
        except BaseException as exc:
            self._error = exc


def write_index(directory: Path, shards: list[ShardLayout]) -> None:
    """model.safetensors.index.json, which transformers reads to find a sharded model's tensors."""
    if len(shards) < 2:
        return
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {n: s.filename for s in shards for n in s.names},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
