"""The search commands' contract: bad input → exit 2 with one `recycler: error:` line; the
dashboard serves."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
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


# `recycler` with Ctrl-C's default action, as a terminal starts it: a process inherits an
# ignored SIGINT (a shell's background job has it ignored, and so would pytest run as one).
RECYCLER_AS_FROM_A_TERMINAL = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from recycler.cli import main; sys.exit(main(sys.argv[1:]))"
)


def start_dashboard(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`recycler dashboard` on a toy study with 4 trials, once it answers; its /api/studies URL."""
    if not (tmp_path / "study.yaml").exists():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        prepared = toy_study(tmp_path)
        with SearchDriver(prepared, ToyEvaluator, capacity=1) as driver:
            driver.run(4)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/studies"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RECYCLER_AS_FROM_A_TERMINAL,
            "dashboard",
            str(tmp_path / "study.yaml"),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    proc.wait()
    raise AssertionError("the dashboard did not answer within 60 s")


def test_dashboard_serves_the_study_on_localhost(tmp_path: Path) -> None:
    proc, url = start_dashboard(tmp_path)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        studies = body["study_summaries"]
        assert [s["study_name"] for s in studies] == ["toy"]
        # Bound to 127.0.0.1 only by default.
        port = int(url.split(":")[2].split("/")[0])
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


def signal_state(pid: int) -> list[str]:
    """Each thread's name and pending, blocked, ignored and caught signal masks (from /proc)."""
    keys = ("Name:", "SigPnd:", "ShdPnd:", "SigBlk:", "SigIgn:", "SigCgt:")
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        with contextlib.suppress(OSError):
            lines = (task / "status").read_text().splitlines()
            out.append(" ".join(ln.split()[-1] for ln in lines if ln.startswith(keys)))
    return out


def signal_while_clients_poll(tmp_path: Path, signum: int) -> None:
    """Start the dashboard, let four clients poll it without pause, send `signum` while
    they do; the dashboard must end within 10 s with the command's exit code."""
    proc, url = start_dashboard(tmp_path)
    stop = threading.Event()
    answered = [0]

    def poll() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    resp.read()
                answered[0] += 1
            except OSError:
                time.sleep(0.05)

    clients = [threading.Thread(target=poll, daemon=True) for _ in range(4)]
    try:
        for c in clients:
            c.start()
        deadline = time.monotonic() + 30
        while answered[0] < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answered[0] >= 8, "the clients got no answers"
        proc.send_signal(signum)
        try:
            _, err = proc.communicate(timeout=10)  # reads its pipes: a full one would block it
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the dashboard still serves 10 s after signal {signum}; "
                f"its threads' signal state: {signal_state(proc.pid)}"
            ) from None
        assert proc.returncode == (130 if signum == signal.SIGINT else 128 + signal.SIGTERM)
        assert "Traceback" not in err.decode(), err.decode()
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=5)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_dashboard_ends_on_a_signal_that_lands_during_requests(tmp_path: Path, signum: int) -> None:
    """With clients polling, the server is nearly always inside a request when the signal
    lands (before the fix a SIGTERM was then lost 8 times in 10); three rounds."""
    for _ in range(3):
        signal_while_clients_poll(tmp_path, signum)


def test_report_replaces_a_non_empty_folder_only_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with SearchDriver(toy_study(tmp_path), ToyEvaluator, capacity=1) as driver:
        driver.run(5)
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli("report", tmp_path / "study.yaml", out, capsys=capsys)
    assert code == 2 and one_error_line(err).endswith(
        f"{out}: exists and is not empty (use --force to replace it)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, _ = run_cli("report", tmp_path / "study.yaml", out, "--force", capsys=capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "hypervolume.png",
        "index.html",
        "pareto.png",
        "weights.png",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]


def test_python_dash_m_recycler_is_the_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "recycler", "front", str(tmp_path / "absent.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "absent.yaml" in one_error_line(proc.stderr)


def test_gpus_a_machine_lacks_are_refused_before_ray_starts(
    tmp_path: Path, micro_zoo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray
    import torch
    from test_search_e2e import study_file

    if torch.cuda.device_count() > 0:
        pytest.skip("this machine has a GPU")
    study = study_file(tmp_path, micro_zoo, cluster={"gpus_per_worker": 1})
    code, out, err = run_cli("search", study, capsys=capsys)
    assert code == 2 and out == ""
    assert one_error_line(err) == (
        "recycler: error: cluster.gpus_per_worker: 1 worker(s) × 1 GPU need 1 GPUs; "
        "this machine has 0"
    )
    assert not ray.is_initialized() and not (tmp_path / "study.db").exists()
