"""The Optuna storage behind a study file's `storage` URL: opened once per process, with a
bounded wait for a server and one `storage:` line for whatever goes wrong. Every command
opens it here; a command that only reads a study (`front`, `export`, `report`,
`dashboard`) opens it with `open_existing`, which creates nothing. A URL is printed only
through `shown` (its password masked), and an error's text only through `masked`.

A SQLite file needs nothing more; a PostgreSQL server (`postgresql://user:pw@host/db`)
needs its driver, psycopg 3, which SQLAlchemy picks for that scheme:
`pip install 'recycler[postgres]'`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from urllib.parse import quote, unquote

import optuna
from optuna.storages import BaseStorage, RDBStorage
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from recycler.config import StudySpec
from recycler.errors import RecyclerError

# Seconds a database server may take to accept a connection before the command gives up.
CONNECT_TIMEOUT = 10
SQLITE_LOCK_WAIT = 60
# The name of a search's connections to a PostgreSQL server (pg_stat_activity).
PG_APPLICATION = "recycler-{pid}"
# Two processes opening one new database race to create Optuna's tables; the loser's
# CREATE fails once the winner's exist, and a second try finds them.
_CREATE_TRIES = 3
_DRIVERS = {"postgresql": "psycopg (pip install 'recycler[postgres]')"}

_opened: dict[str, RDBStorage] = {}
_opened_lock = threading.Lock()


# user:password@ after the scheme, for a URL SQLAlchemy cannot parse (a bad port, say).
_USERINFO_PASSWORD = re.compile(r"(?<=://)([^/@:]*):([^/@]*)@")


def shown(url: str) -> str:
    """The URL as messages print it: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: mask what stands where a password would
        return _USERINFO_PASSWORD.sub(r"\1:***@", url)


def masked(text: str, url: str) -> str:
    """`text` (a driver's error message, say) with `url`'s password masked wherever it appears."""
    try:
        password = make_url(url).password
    except Exception:  # not a URL SQLAlchemy parses
        match = _USERINFO_PASSWORD.search(url)
        password = match.group(2) if match else None
    if not password:
        return text
    for form in {str(password), unquote(str(password)), quote(str(password), safe="")}:
        text = text.replace(form, "***")
    return text


def _engine_kwargs(url: str) -> dict[str, object]:
    """A server must answer within CONNECT_TIMEOUT; a connection a restarted server dropped
    is replaced rather than failing the next statement. A SQLite file that another process
    is writing is waited for up to SQLITE_LOCK_WAIT s (Python's default, 5 s, is short for
    two searches on two busy cores). A server's connections are named after the process
    (`application_name`, PG_APPLICATION): pg_stat_activity shows which search holds each."""
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    if dialect == "sqlite":
        return {"connect_args": {"timeout": SQLITE_LOCK_WAIT}}
    if dialect != "postgresql":
        return {}
    query = url.split("?", 1)[1] if "?" in url else ""
    connect_args: dict[str, object] = {}
    if "connect_timeout=" not in query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT
    if "application_name=" not in query:
        connect_args["application_name"] = PG_APPLICATION.format(pid=os.getpid())
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
            raise RecyclerError(
                f"storage: {shown(url)}: needs {need}: {masked(str(cause), url)}"
            ) from None
        except Exception as exc:  # SQLAlchemy's many errors: a bad URL, no server, a refused login
            raise RecyclerError(
                f"storage: cannot open {shown(url)}: {_first_line(exc, url)}"
            ) from None
        _opened[url] = storage
        return storage


def open_storage(url: str) -> BaseStorage:
    """The storage Optuna's study objects use (finished trials cached in the process)."""
    return optuna.storages.get_storage(rdb_storage(url))


def study_names(storage: BaseStorage, spec: StudySpec) -> list[str]:
    """The names of the studies `spec`'s storage holds."""
    try:
        return optuna.get_all_study_names(storage)
    except Exception as exc:  # the server went away after the connection was made
        raise RecyclerError(
            f"storage: cannot read {shown(spec.storage)}: {_first_line(exc, spec.storage_url)}"
        ) from None


def open_existing(spec: StudySpec) -> BaseStorage:
    """`spec`'s storage, holding `spec`'s study, for a command that reads it: neither a SQLite
    file nor a study is created; one line says which is missing."""
    sqlite = spec.sqlite_path
    if sqlite is not None and not sqlite.exists():
        raise RecyclerError(
            f"storage: no study yet ({sqlite} does not exist); run recycler search first"
        )
    storage = open_storage(spec.storage_url)
    if spec.name not in study_names(storage, spec):
        raise no_such_study(spec)
    return storage


def no_such_study(spec: StudySpec) -> RecyclerError:
    """The error for a storage that does not hold `spec`'s study."""
    return RecyclerError(
        f"name: no study {spec.name!r} in {shown(spec.storage)}; run recycler search first"
    )


def _first_line(exc: BaseException, url: str) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return masked(lines[0], url) if lines else type(exc).__name__
