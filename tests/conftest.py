"""Shared fixtures. `micro_zoo`: the micro demo pool, built once and reused across test runs.

The pool lives in tests/.cache/ (git-ignored) under a name that hashes the
zoo's source code, so editing recycler/zoo/ rebuilds it and nothing else does; the
pools of older sources are removed then. build_zoo locks the directory, so parallel
test processes wait for one build.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "tests" / ".cache"


def _zoo_source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "recycler" / "zoo").glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def micro_zoo() -> Path:
    """A complete micro zoo (DIR with base/, checkpoints/, adapters/, tasks/, study.yaml,
    scores.json).

    Treat it as read-only: it is shared by every test and every later run.
    """
    from recycler.zoo.build import build_zoo

    current = CACHE / f"zoo-micro-{_zoo_source_hash()}"
    zoo = build_zoo(current, size="micro", seed=0, quiet=True)
    for stale in CACHE.glob("zoo-micro-*"):
        if stale != current:
            shutil.rmtree(stale, ignore_errors=True)
    return zoo


# One local Ray cluster per test module that asks for it, shut down after the module.
@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(
        namespace="recycler",
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    yield
    ray.shutdown()
