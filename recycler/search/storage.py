"""The Optuna storage behind a study file's `storage` URL: opened once per process, with a
bounded wait for a server and one `storage:` line for whatever goes wrong.

A SQLite file needs nothing more; a PostgreSQL server (`postgresql://user:pw@host/db`)
needs its driver, psycopg 3, which SQLAlchemy picks for that scheme:
`pip install 'recycler[postgres]'`.
"""

from __future__ import annotations

import threading
import time

import optuna
from optuna.storages import BaseStorage, RDBStorage
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from recycler.errors import RecyclerError

# Seconds a database server may take to accept a connection before the command gives up.
CONNECT_TIMEOUT = 10
SQLITE_LOCK_WAIT = 60
# Two processes opening one new database race to create Optuna's tables; the loser's
# CREATE fails once the winner's exist, and a second try finds them.
_CREATE_TRIES = 3
_DRIVERS = {"postgresql": "psycopg (pip install 'recycler[postgres]')"}

_opened: dict[str, RDBStorage] = {}
_opened_lock = threading.Lock()


def shown(url: str) -> str:
    """The URL as messages print it: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: nothing to mask
        return url


def _engine_kwargs(url: str) -> dict[str, object]:
    """A server must answer within CONNECT_TIMEOUT; a connection a restarted server dropped
    is replaced rather than failing the next statement. A SQLite file that another process
    is writing is waited for up to SQLITE_LOCK_WAIT s (Python's default, 5 s, is short for
    two searches on two busy cores)."""
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    if dialect == "sqlite":
        return {"connect_args": {"timeout": SQLITE_LOCK_WAIT}}
    if dialect != "postgresql":
        return {}
    query = url.split("?", 1)[1] if "?" in url else ""
    connect_args = {} if "connect_timeout=" in query else {"connect_timeout": CONNECT_TIMEOUT}
    return {"connect_args": connect_args, "pool_pre_ping": True}


def _open_rdb(url: str) -> RDBStorage:
    for attempt in range(_CREATE_TRIES):
        try:
            return RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        except Exception as exc:
            if attempt == _CREATE_TRIES - 1 or not _lost_create_race(exc):
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _lost_create_race(exc: Exception) -> bool:
    """Another process created one of Optuna's tables between our check and our CREATE:
    SQLite and PostgreSQL say "already exists"; PostgreSQL may instead break the
    uniqueness of its catalog (an IntegrityError)."""
    return isinstance(exc, sa_exc.IntegrityError) or (
        isinstance(exc, sa_exc.DBAPIError) and "already exists" in str(exc)
    )


def rdb_storage(url: str) -> RDBStorage:
    """The process's RDBStorage for `url` (its SQLAlchemy engine is `.engine`)."""
    with _opened_lock:
        if url in _opened:
            return _opened[url]
        try:
            storage = _open_rdb(url)
        except ImportError as exc:
            scheme = url.split(":", 1)[0]
            need = _DRIVERS.get(scheme, f"the Python driver for {scheme}")
            cause = exc.__cause__ or exc
            raise RecyclerError(f"storage: {shown(url)}: needs {need}: {cause}") from None
        except Exception as exc:  # SQLAlchemy's many errors: a bad URL, no server, a refused login
            raise RecyclerError(f"storage: cannot open {shown(url)}: {_first_line(exc)}") from None
        _opened[url] = storage
        return storage


def open_storage(url: str) -> BaseStorage:
    """The storage Optuna's study objects use (finished trials cached in the process)."""
    return optuna.storages.get_storage(rdb_storage(url))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
