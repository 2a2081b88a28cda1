"""sha256 of checkpoint files for provenance, computed once per file version.

Checkpoints do not change, but hashing a large pool costs a full read of it, so a
file's hash is cached by (path, size, mtime) in the user's cache dir and computed
in a background thread while the merge runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

_LOCK = threading.Lock()


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "recycler" / "sha256.json"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _load_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(entries: dict[str, str]) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _LOCK:
            merged = {**_load_cache(), **entries}
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path]) -> dict[Path, str]:
    """The sha256 of each file, from the cache where the file has not changed."""
    cache = _load_cache()
    out: dict[Path, str] = {}
    fresh: dict[str, str] = {}
    for path in paths:
        key = _key(path)
        if key not in cache:
            fresh[key] = cache[key] = sha256_file(path)
        out[path] = cache[key]
    if fresh:
        _save_cache(fresh)
    return out


def sha256_files_async(paths: Iterable[Path]) -> Future[dict[Path, str]]:
    """`sha256_files` in a daemon thread (hashlib releases the GIL on large reads)."""
    future: Future[dict[Path, str]] = Future()
    paths = list(paths)

    def work() -> None:
        try:
            future.set_result(sha256_files(paths))
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=work, name="recycler-sha256", daemon=True).start()
    return future
