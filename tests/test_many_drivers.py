"""Several `recycler search` processes on one study: a real PostgreSQL server and a SQLite file.

The PostgreSQL tests need a server: RECYCLER_TEST_POSTGRES_URL names one, with rights to
create databases (`make test` starts a throwaway one through .ci/with-postgres where it
can install or find the server). Without it they are skipped. Each test gets a database of
its own, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from killing import kill_at
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from test_search_e2e import study_file

from recycler.cli import main
from recycler.config import load_study_spec
from recycler.search.budget import budget_held, counts_toward_budget, n_counted, put_back
from recycler.search.prepare import prepare
from recycler.search.storage import open_storage
from recycler.search.stored import TrialKey, TrialWriter, queued_attrs
from recycler.search.study import StudyHandle, duplicate_of, enqueue

POSTGRES_ENV = "RECYCLER_TEST_POSTGRES_URL"
N_TRIALS = 8
BASELINES = ["uniform", "singles"]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_ENV} (.ci/with-postgres starts one)")
    import psycopg  # the optional `postgres` extra: needed only once a server is there

    url = make_url(server)
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return str(request.getfixturevalue("postgres_url"))


def shared_study(tmp_path: Path, zoo: Path, storage: str, **search: object) -> Path:
    path = study_file(
        tmp_path,
        zoo,
        search={"n_trials": N_TRIALS, "baselines": BASELINES, **search},
        eval={"limit": 16},
    )
    data = yaml.safe_load(path.read_text())
    data["storage"] = storage
    path.write_text(yaml.safe_dump(data))
    return path


def start_search(study_path: Path) -> subprocess.Popen[bytes]:
    """`recycler search` in a process group of its own (its local Ray cluster included)."""
    return subprocess.Popen(
        [sys.executable, "-m", "recycler.cli", "search", str(study_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


@contextlib.contextmanager
def searches(study_path: Path, n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_search(study_path) for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def assert_running(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"a search ended early (exit {proc.returncode}): {err[-3000:]}")


def trials_of(study_path: Path) -> list[FrozenTrial]:
    spec = load_study_spec(study_path)
    try:
        return optuna.load_study(study_name=spec.name, storage=spec.storage_url).get_trials()
    except Exception:  # not created yet
        return []


def failed_search(study_path: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`recycler search` expected to stop at once: the process and its stderr's lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "recycler.cli", "search", str(study_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, proc.stderr.strip().splitlines()


def finish(proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]


def owner_pid(trial: FrozenTrial) -> int | None:
    owner = trial.user_attrs.get(TrialKey.OWNER)
    return int(owner.rsplit(":", 2)[1]) if isinstance(owner, str) else None


def assert_one_budget(trials: list[FrozenTrial], n_checkpoints: int) -> None:
    """Exactly n_trials counted, every baseline run once, no recipe evaluated twice."""
    counted = [t for t in trials if counts_toward_budget(t)]
    assert len(counted) == N_TRIALS, [
        (t.number, t.state.name, t.user_attrs.get(TrialKey.FAIL_REASON)) for t in trials
    ]
    assert all(t.state == TrialState.COMPLETE for t in counted)
    labels = [
        t.user_attrs[TrialKey.BASELINE]
        for t in trials
        if TrialKey.BASELINE in t.user_attrs and TrialKey.RERUN_OF not in t.user_attrs
    ]
    assert len(labels) == len(set(labels)) == 1 + n_checkpoints, labels  # each enqueued once
    assert (
        len({t.user_attrs[TrialKey.BASELINE] for t in counted if TrialKey.BASELINE in t.user_attrs})
        == 1 + n_checkpoints
    )
    fresh = [
        repr(sorted(t.user_attrs[TrialKey.WEIGHTS].items()))
        for t in counted
        if TrialKey.CACHE_HIT not in t.user_attrs
    ]
    assert len(fresh) == len(set(fresh))
    assert not any(TrialKey.DUPLICATE_OF in t.user_attrs for t in trials)


def test_two_searches_spend_one_budget(
    tmp_path: Path, micro_zoo: Path, storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    study_path = shared_study(tmp_path, micro_zoo, storage_url)
    n_checkpoints = len(list((micro_zoo / "checkpoints").iterdir()))
    with searches(study_path, 2) as (first, second):
        # `front` and `export` from a third process while both run.
        deadline = time.monotonic() + 300
        while sum(t.state == TrialState.COMPLETE for t in trials_of(study_path)) < 2:
            assert_running(first, second)
            assert time.monotonic() < deadline, "no trial finished within 300 s"
            time.sleep(0.5)
        assert main(["front", str(study_path)]) == 0
        assert "Pareto set of study e2e" in capsys.readouterr().out
        assert main(["export", str(study_path), str(tmp_path / "knee")]) == 0
        assert (tmp_path / "knee" / "config.json").is_file()
        finish(first)
        finish(second)
    trials = trials_of(study_path)
    assert_one_budget(trials, n_checkpoints)
    # Neither failed a trial of the other's: nothing failed at all.
    assert not [t.number for t in trials if t.state == TrialState.FAIL]
    assert {owner_pid(t) for t in trials if t.state == TrialState.COMPLETE} <= {
        first.pid,
        second.pid,
    }


def test_a_killed_search_is_finished_by_the_other(
    tmp_path: Path, micro_zoo: Path, storage_url: str
) -> None:
    study_path = shared_study(tmp_path, micro_zoo, storage_url)
    n_checkpoints = len(list((micro_zoo / "checkpoints").iterdir()))
    with searches(study_path, 2) as (survivor, victim):
        kill_at(  # the driver and its Ray, a proposed trial in flight
            victim,
            # Up: it owns a trial. Not held with a trial it has taken but not yet claimed:
            # the other would fail that one as never claimed.
            lambda search, trials: (
                any(owner_pid(t) == search.pid for t in trials)
                and all(owner_pid(t) is not None for t in trials if t.state == TrialState.RUNNING)
            ),
            lambda trials: (
                sum(t.state == TrialState.COMPLETE for t in trials) >= 2
                and any(
                    t.state == TrialState.RUNNING and owner_pid(t) == victim.pid and t.params
                    for t in trials
                )
            ),
            "a proposed trial of the victim in flight",
            storage_url=storage_url,
            study="e2e",
            held=[survivor],
        )
        done_before = {
            t.number: (t.params, t.values)
            for t in trials_of(study_path)
            if t.state == TrialState.COMPLETE
        }
        finish(survivor)
    trials = trials_of(study_path)
    for number, (params, values) in done_before.items():  # nothing completed is lost
        assert (trials[number].params, trials[number].values) == (params, values)
    assert_one_budget(trials, n_checkpoints)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # Only the victim's trials in flight failed, as stale, each run again and completed.
    assert failed and all(
        owner_pid(t) == victim.pid and t.user_attrs.get(TrialKey.STALE) for t in failed
    )
    assert any(t.params for t in failed)
    for t in failed:
        reruns = [r for r in trials if r.user_attrs.get(TrialKey.RERUN_OF) == t.number]
        if t.params:
            assert len(reruns) == 1 and reruns[0].state == TrialState.COMPLETE
            assert t.params.items() <= reruns[0].params.items()
        else:  # claimed, nothing proposed yet: the sampler proposes anew, nothing to re-run
            assert reruns == []


@pytest.mark.parametrize("case", ["unreachable", "wrong password", "missing driver"])
def test_bad_storage_is_one_line(
    case: str, tmp_path: Path, micro_zoo: Path, request: pytest.FixtureRequest
) -> None:
    if case == "unreachable":
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"postgresql://recycler:pw@127.0.0.1:{port}/recycler"
    elif case == "wrong password":
        url = (
            make_url(request.getfixturevalue("postgres_url"))
            .set(password="wrong")
            .render_as_string(hide_password=False)
        )
    else:  # a driver SQLAlchemy knows and recycler does not install
        url = "postgresql+pg8000://recycler:pw@127.0.0.1:5432/recycler"
    study_path = shared_study(tmp_path, micro_zoo, url)
    started = time.monotonic()
    proc, lines = failed_search(study_path)
    assert (
        proc.returncode == 2
        and len(lines) == 1
        and lines[0].startswith(f"recycler: error: {study_path}: storage: ")
    ), proc.stderr
    assert ":pw@" not in lines[0] and ":wrong@" not in lines[0]  # the password is masked
    assert time.monotonic() - started < 90
    expected = {
        "unreachable": "Connection refused",
        "wrong password": "password authentication failed",
        "missing driver": "pg8000",
    }[case]
    assert expected in lines[0]


def test_a_study_name_taken_with_other_objectives(
    tmp_path: Path, micro_zoo: Path, storage_url: str
) -> None:
    study_path = shared_study(tmp_path, micro_zoo, storage_url)
    prepare(load_study_spec(study_path))  # the study as this file creates it
    data = yaml.safe_load(study_path.read_text())
    data["objectives"] = data["objectives"][:1]
    study_path.write_text(yaml.safe_dump(data))
    proc, lines = failed_search(study_path)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert (
        lines[0].startswith(f"recycler: error: {study_path}: storage: study 'e2e'")
        and "other objectives (inc/maximize, rev/maximize)" in lines[0]
    )


def test_a_trial_put_back_is_taken_again_and_a_duplicate_step_counts_for_nothing(
    storage_url: str,
) -> None:
    """The budget's and the duplicate rule's storage operations, on the real storages."""
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name=f"unit-{uuid.uuid4().hex[:8]}", storage=storage)
    handle = StudyHandle(study, storage, created=True)
    step = queued_attrs({"x": 0.5}, baseline="greedy", greedy_members=["a", "b"])
    enqueue(study, {"x": 0.5}, step)
    enqueue(study, {"x": 0.5}, step)  # a second process queued the same step meanwhile
    first, second = study.ask(), study.ask()
    assert budget_held(study) == 2
    assert (
        duplicate_of(study, first.number) is None
        and duplicate_of(study, second.number) == first.number
    )
    TrialWriter.of(second).duplicate(first.number)
    study.tell(second, state=TrialState.FAIL)
    put_back(handle, first.number)  # over the budget: back in the queue, untouched
    assert budget_held(study) == 0 and study.get_trials()[first.number].state == TrialState.WAITING
    again = study.ask()
    assert again.number == first.number and budget_held(study) == 1
    study.tell(again, 1.0)
    assert n_counted(study) == 1  # the duplicate counts for nothing
