"""Killing a search process at a chosen moment of its study.

On the micro pool a trial's evaluation takes a few hundredths of a second: a test that
looks at the study while its searches run sees them end before it sees the moment, and a
search seen "up" a moment late has spent the budget by the time it is stopped. So the test
looks at the study with the searches stopped, once after each of their commits.

A look: each search the test does not hold is stopped (SIGSTOP to its driver alone; its
Ray's processes go on). Where one of them was stopped inside a transaction or a read
(`_Storage.settled`: on SQLite a lock of the database file, on PostgreSQL a connection
that is not idle), they go on and the test tries again at once. Otherwise the study is
read, and what was read stays true while they are stopped: a search found up (`up`: its
Ray and workers running, which a long stop must not interrupt) is held stopped, and the
victim is killed, with its process group, where the look shows the moment, so that what
the test saw is what the kill left. The others go on until their next commit
(`_Storage.next_commit`: SQLite's data_version, PostgreSQL's snapshot).

With several searches (`held`: the study's other drivers), each is held once it is up
until all are up; from then on the victim alone steps on, the others held until it is
killed: on the micro pool one search alone would otherwise spend the whole budget before
another is up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

from recycler.search.storage import PG_APPLICATION
from recycler.search.stored import TrialKey

Search = subprocess.Popen[bytes]
Trials = list[FrozenTrial]


def kill_at(
    victim: Search,
    up: Callable[[Search, Trials], bool],
    moment: Callable[[Trials], bool],
    what: str,
    *,
    storage_url: str,
    study: str,
    held: Sequence[Search] = (),
    timeout_s: float = 300,
) -> None:
    """SIGKILL `victim`'s process group at the first look, once every search is up, that
    shows `moment`; each look is taken with every search stopped between its writes."""
    searches = [victim, *held]
    holding: list[Search] = []  # up, and stopped until the victim is killed
    seen: Trials = []
    deadline = time.monotonic() + timeout_s
    storage = _Storage(storage_url, study)
    try:
        while True:
            assert time.monotonic() < deadline, (
                f"no {what} within {timeout_s:.0f} s; the last look: {_summary(seen)}"
            )
            _assert_running(searches, what)
            going = [s for s in searches if s not in holding]
            storage.next_commit()
            _sigstop(going)
            if not storage.settled(searches):
                _sigcont(going)  # stopped inside a transaction or a read: look again
                continue
            seen = storage.trials()
            holding.extend(s for s in going if up(s, seen))
            if len(holding) == len(searches):  # everyone up, everyone stopped
                if moment(seen):
                    os.killpg(victim.pid, signal.SIGKILL)
                    victim.wait(timeout=30)
                    return
                holding.remove(victim)  # the victim alone goes on: a step
            _sigcont([s for s in searches if s not in holding])
    finally:
        _sigcont(searches)
        storage.close()


class _Storage:
    """The study's storage as the test sees it: its trials, when its searches commit, and
    whether a stopped search holds any of it."""

    def __init__(self, url: str, study: str) -> None:
        self.url = make_url(url)
        self.sqlite = self.url.get_backend_name() == "sqlite"
        self.study_name = study
        self.study: optuna.Study | None = None
        self.conn: Any = None  # SQLite: data_version; PostgreSQL: the activity views
        self.version: object = None

    def _connect(self) -> Any:
        if self.conn is None:
            if self.sqlite:
                assert self.url.database
                if not os.path.exists(self.url.database):
                    return None  # not created yet: connecting would create it
                # No wait: every search is stopped when a lock is tried.
                self.conn = sqlite3.connect(self.url.database, timeout=0, isolation_level=None)
            else:
                import psycopg

                dsn = self.url.set(drivername="postgresql").render_as_string(False)
                self.conn = psycopg.connect(dsn, autocommit=True)
        return self.conn

    def _version(self) -> object:
        """Changes whenever another connection commits: SQLite's data_version, PostgreSQL's
        snapshot (a finished write moves its xmax or leaves its list of transactions)."""
        conn = self._connect()
        if conn is None:
            return None
        if self.sqlite:
            try:
                return conn.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.OperationalError as exc:  # a commit under way: not landed yet
                _locked(exc)
                return self.version
        return conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]

    def next_commit(self, longest_s: float = 1.0) -> None:
        """Wait until a search has committed something since the last look (at most
        `longest_s`: a search busy elsewhere is looked at anyway)."""
        deadline = time.monotonic() + longest_s
        while time.monotonic() < deadline and self._version() == self.version:
            time.sleep(0.001)
        self.version = self._version()

    def settled(self, searches: Sequence[Search]) -> bool:
        """Whether the stopped `searches` hold nothing of the storage: no transaction open,
        no statement or read under way."""
        conn = self._connect()
        if conn is None:
            return True
        if self.sqlite:
            try:  # the exclusive lock is refused while any lock of the file is held
                conn.execute("BEGIN EXCLUSIVE")
                conn.execute("ROLLBACK")
                return True
            except sqlite3.OperationalError as exc:
                _locked(exc)
                return False
        time.sleep(0.01)  # a statement sent just before the stop reaches its server process
        names = [PG_APPLICATION.format(pid=s.pid) for s in searches]
        busy = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = ANY(%s) AND state IS DISTINCT FROM 'idle'",
            (names,),
        ).fetchone()
        return not busy[0]

    def trials(self) -> Trials:
        """The study's trials (none before the searches have created it). Optuna's storage
        is opened only then: opening it creates its tables where they are missing."""
        if self.study is None:
            conn = self._connect()
            if conn is None or not self._has_study(conn):
                return []
            url = self.url.render_as_string(hide_password=False)
            storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
            self.study = optuna.load_study(study_name=self.study_name, storage=storage)
        return self.study.get_trials(deepcopy=False)

    def _has_study(self, conn: Any) -> bool:
        if self.sqlite:
            try:
                query = "SELECT 1 FROM studies WHERE study_name = ?"
                return conn.execute(query, (self.study_name,)).fetchone() is not None
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return False
                raise
        if conn.execute("SELECT to_regclass('studies')").fetchone()[0] is None:
            return False
        query = "SELECT 1 FROM studies WHERE study_name = %s"
        return conn.execute(query, (self.study_name,)).fetchone() is not None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _summary(trials: Trials) -> list[tuple[int, str, object]]:
    return [(t.number, t.state.name, t.user_attrs.get(TrialKey.OWNER)) for t in trials]


def _sigstop(searches: Sequence[Search]) -> None:
    """SIGSTOP each search and wait until every thread of it is stopped (a signal is
    delivered asynchronously: a thread inside a system call finishes it first)."""
    for search in searches:
        os.kill(search.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    for search in searches:
        while not _all_threads_stopped(search.pid):
            assert time.monotonic() < deadline, f"process {search.pid} not stopped within 10 s"
            time.sleep(0.001)


def _all_threads_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:  # gone: nothing runs
        return True
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # the thread has ended
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def _locked(exc: sqlite3.OperationalError) -> None:
    """An error of SQLite other than a lock held elsewhere is raised."""
    if "locked" not in str(exc):
        raise exc


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
