"""The storage has one owner (`recycler.search.storage`): every command opens it there, a
reading command creates nothing, and a URL's password never reaches the terminal."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
import yaml
from sqlalchemy.engine import make_url
from test_many_drivers import postgres_url, storage_url  # noqa: F401  (fixtures)
from test_search_cli import one_error_line, run_cli

from recycler.search.storage import PG_APPLICATION, masked, open_storage, shown


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:s3cret@db.example:5432/x", "postgresql://u:***@db.example:5432/x"),
        # A port SQLAlchemy cannot parse: the password is masked all the same.
        ("postgresql://u:s3cret@db.example:port/x", "postgresql://u:***@db.example:port/x"),
        ("postgresql://u@db.example/x", "postgresql://u@db.example/x"),
        ("sqlite:////tmp/r.db", "sqlite:////tmp/r.db"),
    ],
)
def test_a_url_is_shown_masked(url: str, expected: str) -> None:
    assert shown(url) == expected
    said = f"driver said: cannot reach {url}"
    assert masked(said, url) == said.replace("s3cret", "***")


def study_file(tmp_path: Path, storage: str) -> Path:
    data = {
        "name": "absent",
        "storage": storage,
        "pool": {"checkpoints": ["a"]},
        "eval": {"tasks_dir": "."},
        "objectives": [{"name": "a", "task": "t", "metric": "acc"}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", ["front", "export", "dashboard", "report"])
def test_a_reading_command_on_a_storage_without_the_study(
    tmp_path: Path,
    storage_url: str,  # noqa: F811
    command: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The storage exists and holds another study only.
    optuna.create_study(study_name="other", storage=open_storage(storage_url))
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = [tmp_path / "out"] if command in ("export", "report") else []
    code, out, err = run_cli(command, study_file(tmp_path, storage_url), *extra, capsys=capsys)
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert line == f"recycler: error: name: no study 'absent' in {shown(storage_url)}; " + (
        "run recycler search first"
    )
    password = make_url(storage_url).password
    assert password is None or password not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "study.yaml"])


def test_the_dashboard_masks_a_refused_password(
    tmp_path: Path,
    postgres_url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = make_url(postgres_url).set(password="wrong-pw").render_as_string(hide_password=False)
    code, _, err = run_cli("dashboard", study_file(tmp_path, url), capsys=capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith("recycler: error: storage: cannot open ")
    assert "password authentication failed" in line and "wrong-pw" not in line


def test_a_server_connection_is_named_after_its_process(postgres_url: str) -> None:  # noqa: F811
    """pg_stat_activity tells which search holds a connection (the kill tests read it too)."""
    import psycopg

    storage = open_storage(postgres_url)
    optuna.create_study(study_name="named", storage=storage)
    admin = make_url(postgres_url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False)) as conn:
        names = {
            row[0]
            for row in conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
            )
        }
    assert PG_APPLICATION.format(pid=os.getpid()) in names
