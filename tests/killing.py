"""Killing a search process at a chosen moment of its study.

On the micro pool a trial's evaluation takes a few hundredths of a second: a test that
looks at the study while its searches run sees them end before it sees the moment. So the
test steps the searches: once a search is up (`up`: its Ray and workers running, which a
stop must not interrupt), it is stopped (SIGSTOP to its driver alone; its Ray's processes
go on) while the test looks, and the victim is killed, with its process group, only if the
moment is there, so that what the test saw is what the kill left; otherwise it goes on
for a few milliseconds and the test looks again.

A search is stopped between its writes only: on SQLite while the test holds the database's
write lock; on PostgreSQL while the test holds an exclusive lock on the trials table (a
commit sent before the stop has landed), and only where the stopped searches' connections
are idle afterwards (none stopped inside a transaction, whose locks would keep the others
waiting).

With several searches (`held`: the study's other drivers), each is stopped once it is up
and held so until all are up; from then on the victim alone steps on, the others held
until it is killed: on the micro pool one search alone would otherwise spend the whole
budget before another is up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from sqlalchemy.engine import make_url

from recycler.search.storage import PG_APPLICATION

Search = subprocess.Popen[bytes]


def kill_at(
    victim: Search,
    up: Callable[[Search], bool],
    moment: Callable[[], bool],
    what: str,
    *,
    storage_url: str,
    held: Sequence[Search] = (),
    timeout_s: float = 300,
) -> None:
    """SIGKILL `victim`'s process group at the first look, once every search is up, where
    `moment()` holds; each look is taken with the searches that are up stopped."""
    searches = [victim, *held]
    known_up: set[int] = set()
    stopped: list[Search] = []  # up, and stopped at a look
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            _assert_running(searches, what)
            known_up.update(s.pid for s in searches if s.pid not in known_up and up(s))
            to_stop = [s for s in searches if s not in stopped and s.pid in known_up]
            with _stopped_between_writes(to_stop, storage_url) as settled:
                if not settled:
                    _sigcont(to_stop)
                else:
                    stopped.extend(to_stop)
                    if len(stopped) == len(searches):  # everyone up, everyone stopped
                        if moment():
                            os.killpg(victim.pid, signal.SIGKILL)
                            victim.wait(timeout=30)
                            return
                        stopped.remove(victim)  # the victim alone goes on: a step
                        _sigcont([victim])
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
            time.sleep(0.005)
    finally:
        _sigcont(held)


@contextlib.contextmanager
def _stopped_between_writes(searches: Sequence[Search], storage_url: str) -> Iterator[bool]:
    """SIGSTOP each search between its writes; yields whether they are all stopped so
    (False: the caller continues them and tries again)."""
    url = make_url(storage_url)
    if not searches:  # nothing to stop (the study may not even be there yet)
        yield True
        return
    if url.get_backend_name() == "sqlite":
        assert url.database
        conn = sqlite3.connect(url.database, timeout=60, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the searches wait for it between their writes
            _sigstop(searches)
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        yield True
        return
    import psycopg

    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    names = [PG_APPLICATION.format(pid=s.pid) for s in searches]
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("LOCK TABLE trials IN EXCLUSIVE MODE")  # commits sent have landed
            _sigstop(searches)
        time.sleep(0.01)  # a statement sent just before the stop reaches its server process
        busy = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = ANY(%s) AND state <> 'idle'",
            (names,),
        ).fetchone()
        yield busy is not None and busy[0] == 0


def _sigstop(searches: Sequence[Search]) -> None:
    for search in searches:
        os.kill(search.pid, signal.SIGSTOP)


def _sigcont(searches: Sequence[Search]) -> None:
    for search in searches:
        with contextlib.suppress(ProcessLookupError):
            os.kill(search.pid, signal.SIGCONT)


def _assert_running(searches: Sequence[Search], what: str) -> None:
    for search in searches:
        if search.poll() is not None:
            # What its Ray left holds the stderr pipe open: gone first, so the read ends.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(search.pid, signal.SIGKILL)
            err = search.stderr.read().decode() if search.stderr else ""
            pytest.fail(f"a search ended (exit {search.returncode}) before {what}: {err[-3000:]}")
