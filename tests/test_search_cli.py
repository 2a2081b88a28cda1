"""The search commands' contract: bad input → exit 2 with one `recycler: error:` line; the dashboard serves."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from test_search_front import ToyEvaluator, toy_study

from recycler.cli import main
from recycler.search.run import SearchDriver


def run_cli(*argv: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recycler: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_study_file_in_a_subprocess_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "study.yaml").write_text(
        "name: x\npool: {checkpoints: [a]}\nsearch: {sampler: sobol}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "recycler.cli", "search", str(tmp_path / "study.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert line.endswith(
        "study.yaml: search.sampler: must be one of tpe, nsga2, gp, random, cmaes (and 2 more)"
    )
    assert not (tmp_path / "recycler.db").exists()  # nothing half-written


@pytest.mark.parametrize("command", ["search", "front", "export", "dashboard", "report"])
def test_every_command_refuses_a_bad_study_file(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "study.yaml").write_text(
        yaml.safe_dump({"name": "x", "pool": {"checkpoints": ["a"]}, "objectives": []})
    )
    extra = [tmp_path / "out"] if command in ("export", "report") else []
    code, _, err = run_cli(command, tmp_path / "study.yaml", *extra, capsys=capsys)
    assert code == 2
    assert (
        "objectives: list should have at least 1 item" in one_error_line(err)
        or "eval: required" in err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


@pytest.mark.parametrize("command", ["front", "export", "dashboard", "report"])
def test_commands_on_a_study_never_run(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "name": "x",
        "pool": {"checkpoints": ["a"]},
        "eval": {"tasks_dir": "."},
        "objectives": [{"name": "a", "task": "t", "metric": "acc"}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    extra = [tmp_path / "out"] if command in ("export", "report") else []
    code, _, err = run_cli(command, tmp_path / "study.yaml", *extra, capsys=capsys)
    assert code == 2 and "run recycler search first" in one_error_line(err)
    assert not (tmp_path / "recycler.db").exists() and not (tmp_path / "out").exists()


def test_choosing_a_trial_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_study(tmp_path)
    with SearchDriver(prepared, ToyEvaluator, capacity=1) as driver:
        driver.run(5)
    study = tmp_path / "study.yaml"
    out = tmp_path / "out"
    for args, message in [
        (["--trial", "99"], "--trial: study 'toy' has no trial 99"),
        (["--pick", "best:speed"], "--pick: no objective 'speed' (objectives: quality, cost)"),
        (["--pick", "median"], "--pick: must be knee or best:OBJECTIVE"),
    ]:
        code, _, err = run_cli("export", study, out, *args, capsys=capsys)
        assert code == 2 and message in one_error_line(err)
    assert not out.exists()
    code, _, err = run_cli("search", study, "--n-trials", "0", capsys=capsys)
    assert code == 2 and "--n-trials: must be at least 1" in one_error_line(err)
    code, out_text, _ = run_cli("front", study, "--format", "json", capsys=capsys)
    assert code == 0 and json.loads(out_text)["trials"]["complete"] == 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dashboard_serves_the_study_on_localhost(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prepared = toy_study(tmp_path)
    with SearchDriver(prepared, ToyEvaluator, capacity=1) as driver:
        driver.run(4)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recycler.cli",
            "dashboard",
            str(tmp_path / "study.yaml"),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline and body is None:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/studies", timeout=2
                ) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, "the dashboard did not answer"
        studies = body["study_summaries"]
        assert [s["study_name"] for s in studies] == ["toy"]
        # Bound to 127.0.0.1 only by default.
        with socket.socket() as s:
            s.settimeout(1)
            other = [
                a
                for a in {
                    i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
                }
                if not a.startswith("127.")
            ]
            for address in other:
                assert s.connect_ex((address, port)) != 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
