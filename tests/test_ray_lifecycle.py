"""Where a search's Ray cluster comes from, how long it may take to get one, how a
search ends on a signal, and what it logs when stderr is not a terminal.

Every test runs `recycler search` as a subprocess with Ray's temp folder (RAY_TMPDIR)
in a fresh folder of its own, so a stale `ray_current_cluster` file is written there
and not on the machine, and checks that no process of that folder is left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = [
    {"name": "inc", "task": "zoo_inc", "metric": "acc"},
    {"name": "rev", "task": "zoo_rev", "metric": "acc"},
]
TRIAL_LINE = re.compile(r"^trial (\d+) \[([^\]]+)\] (complete|failed)(?: \([^)]*\))?: (.*)$")


def dead_port() -> int:
    """A port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_using(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (Ray's processes name their session's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(
                (
                    ln
                    for ln in (entry / "status").read_text().splitlines()
                    if ln.startswith("State:")
                ),
                "",
            )
        except OSError:
            continue
        if str(folder) in cmdline and "zombie" not in state:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """Ray's temp folder for one test (short: Ray's socket paths must fit 107 bytes);
    afterwards, every Ray process the test's search started must be gone."""
    folder = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    try:
        yield folder
        deadline = time.monotonic() + 30
        while processes_using(folder) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = processes_using(folder)
        assert not left, "processes left running:\n" + "\n".join(left)
    finally:
        for line in processes_using(folder):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def write_stale_address(ray_tmpdir: Path) -> str:
    """What a `ray start` that ended without `ray stop` leaves: the address of a dead GCS."""
    address = f"127.0.0.1:{dead_port()}"
    (ray_tmpdir / "ray").mkdir(exist_ok=True)
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(address)
    return address


def study_file(tmp_path: Path, zoo: Path, n_trials: int, **cluster: Any) -> Path:
    data = yaml.safe_load((zoo / "study.yaml").read_text())
    data["name"] = "lifecycle"
    data["storage"] = "sqlite:///study.db"
    data["pool"] = {"base": str(zoo / "base"), "checkpoints": [str(zoo / "checkpoints" / "*")]}
    data["objectives"] = OBJECTIVES
    data["eval"]["tasks_dir"] = str(zoo / "tasks")
    data["search"] = {**data.get("search", {}), "n_trials": n_trials, "baselines": ["uniform"]}
    data["cluster"] = {**data.get("cluster", {}), **cluster}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_search(study: Path, ray_tmpdir: Path) -> subprocess.Popen[str]:
    """`recycler search` with stdout and stderr piped (not a terminal), Ray's temp folder
    isolated."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TMPDIR")}
    env["RAY_TMPDIR"] = str(ray_tmpdir)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "recycler.cli", "search", str(study)],
        cwd=study.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def load(study: Path) -> optuna.Study:
    return optuna.load_study(
        study_name="lifecycle", storage=f"sqlite:///{study.parent / 'study.db'}"
    )


def test_a_stale_cluster_file_does_not_change_where_a_search_runs_and_a_piped_run_logs_each_trial(
    tmp_path: Path, micro_zoo: Path, ray_tmpdir: Path
) -> None:
    stale = write_stale_address(ray_tmpdir)
    study = study_file(tmp_path, micro_zoo, n_trials=3, address=None)
    proc = start_search(study, ray_tmpdir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    # Its own cluster: a Ray session in the isolated folder, nothing tried at the stale address.
    assert list((ray_tmpdir / "ray").glob("session_2*")), err
    assert stale not in err
    trials = load(study).get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    # One line per finished trial, in the order they were told, with what the study stored.
    lines = [m for ln in err.splitlines() if (m := TRIAL_LINE.match(ln))]
    assert [int(m.group(1)) for m in lines] == [0, 1, 2], err
    for m in lines:
        t = trials[int(m.group(1))]
        assert m.group(2) == t.user_attrs.get("baseline", "search") and m.group(3) == "complete"
        scores = dict(kv.split("=") for kv in m.group(4).split(" · ")[0].split())
        assert {k: float(v) for k, v in scores.items()} == pytest.approx(
            {"inc": t.values[0], "rev": t.values[1]}, rel=1e-5
        )
        # Seconds as printed (two decimals) from what the study stored (rounded on its own).
        for kind in ("merge", "eval"):
            shown = re.search(rf"{kind} ([0-9.]+) s", m.group(4))
            assert shown is not None, m.group(4)
            assert float(shown.group(1)) == pytest.approx(
                t.user_attrs[f"{kind}_seconds"], abs=0.011
            )
    # The same summary as on a terminal, at the end.
    assert (
        out.strip().splitlines()[-1].startswith("study lifecycle: 3 trials (3 complete, 0 failed)")
    )


@pytest.mark.parametrize("scheme", ["", "ray://"], ids=["gcs", "ray-client"])
@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_an_address_that_does_not_answer_fails_in_bounded_time_with_one_line(
    tmp_path: Path, micro_zoo: Path, ray_tmpdir: Path, kind: str, scheme: str
) -> None:
    """refused: nothing listens. silent: a socket accepts connections and never answers
    (a host that is up with something else, or a hung head), where Ray would retry forever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = int(silent.getsockname()[1]) if kind == "silent" else dead_port()
        study = study_file(
            tmp_path,
            micro_zoo,
            n_trials=2,
            address=f"{scheme}127.0.0.1:{port}",
            connect_timeout_s=3,
        )
        proc = start_search(study, ray_tmpdir)
        try:
            _, err = proc.communicate(timeout=240)  # before: no end at all
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("recycler: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(
        f"recycler: error: cluster.address: cannot connect to Ray at {scheme}127.0.0.1:{port}"
    ) or errors[0].startswith(
        f"recycler: error: cluster.address: Ray at {scheme}127.0.0.1:{port} did not answer"
    )
    if kind == "silent":
        assert "did not answer within 3 s (cluster.connect_timeout_s)" in errors[0], errors[0]
    else:
        assert errors[0].endswith(f"cannot connect to 127.0.0.1:{port}: Connection refused"), (
            errors[0]
        )
    if kind == "refused":  # refused at once, while the study was being opened: none written
        assert not (study.parent / "study.db").exists()
    else:  # nothing of the study is left running
        assert not [t for t in load(study).get_trials() if t.state.name == "RUNNING"]


def test_sigterm_while_the_cluster_starts_ends_the_search_promptly(
    tmp_path: Path, micro_zoo: Path, ray_tmpdir: Path
) -> None:
    study = study_file(tmp_path, micro_zoo, n_trials=2, address=None)
    proc = start_search(study, ray_tmpdir)
    try:
        deadline = time.monotonic() + 180
        while not list((ray_tmpdir / "ray").glob("session_2*")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        assert list((ray_tmpdir / "ray").glob("session_2*")), "Ray did not start"
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the search still runs 10 s after SIGTERM") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    # Ray starts while the study is opened: the study may not be written yet. Once it is,
    # the trial in flight is failed and queued again, as for any interruption, and the
    # search says what it kept.
    if "study 'lifecycle' are stored in" in err:
        trials = load(study).get_trials()
        assert not [t for t in trials if t.state.name == "RUNNING"]
        assert "`recycler search " in err


def test_sigterm_mid_search_says_what_was_kept_without_ray_noise(
    tmp_path: Path, micro_zoo: Path, ray_tmpdir: Path
) -> None:
    study = study_file(tmp_path, micro_zoo, n_trials=40, address=None)
    proc = start_search(study, ray_tmpdir)
    assert proc.stderr is not None
    try:
        seen = []
        for line in proc.stderr:  # a line per finished trial: stderr is a pipe
            seen.append(line)
            if line.startswith("trial "):
                proc.send_signal(signal.SIGTERM)
                break
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, err
    stored = sum(t.state.is_finished() for t in load(study).get_trials())
    assert (
        f"recycler: stopped: {stored} finished trial(s) of study 'lifecycle' are stored in "
        f"sqlite:///study.db; `recycler search {study}` resumes it"
    ) in err
    # Ray's token-authentication note and its C++ stack dump are not shown (no -v).
    assert "Token authentication" not in err and "SIGTERM received" not in err, err
    assert "Traceback" not in err, err
