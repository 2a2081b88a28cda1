"""Killing a search process at a chosen moment of its study.

On the micro pool a trial's evaluation takes a few hundredths of a second: a test that
looks at the study while its searches run sees them end before it sees the moment. So
once the searches are under way (`started`: their Ray and workers up), every search
process is stopped (SIGSTOP to the process alone; its Ray's processes go on) while the
test looks, and the victim is killed, with its process group, only if the moment is
there, so that what the test saw is what the kill left; otherwise the searches go on for
a few milliseconds and the test looks again. On SQLite the searches are stopped while the
test holds the database's write lock, so that none is stopped in the middle of a write
(whose lock would keep the test's look waiting).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url


def kill_at(
    victim: subprocess.Popen[bytes],
    started: Callable[[], bool],
    moment: Callable[[], bool],
    what: str,
    *,
    also_stopped: Sequence[subprocess.Popen[bytes]] = (),
    sqlite_file: Path | None = None,
    timeout_s: float = 300,
) -> None:
    """Once `started()` holds, SIGKILL `victim`'s process group at the first look where
    `moment()` holds; each look is taken with `victim` and `also_stopped` (the study's
    other drivers) stopped."""
    procs = [victim, *also_stopped]
    deadline = time.monotonic() + timeout_s
    while not started():
        _assert_running(procs, what)
        assert time.monotonic() < deadline, f"the searches not under way in {timeout_s:.0f} s"
        time.sleep(0.05)
    while True:
        _assert_running(procs, what)
        _stop_between_writes(procs, sqlite_file)
        try:
            if moment():
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait(timeout=30)
                return
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.005)


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite storage URL; None for a server's."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def _stop_between_writes(procs: Sequence[subprocess.Popen[bytes]], db: Path | None) -> None:
    """SIGSTOP each process; on SQLite while holding the write lock (the processes wait for
    it between their writes, never inside one)."""
    if db is None:
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        return
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def _assert_running(procs: Sequence[subprocess.Popen[bytes]], what: str) -> None:
    for proc in procs:
        if proc.poll() is not None:
            # What its Ray left holds the stderr pipe open: gone first, so the read ends.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"a search ended (exit {proc.returncode}) before {what}: {err[-3000:]}")
