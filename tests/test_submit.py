"""`recycler submit`: a study runs as a Ray job on a real local cluster with token auth.

The module starts its own head (`ray start --head --block`) with RAY_AUTH_MODE=token,
its own ports, temp dir and HOME (the token file lives there), so it disturbs no other
Ray on the machine; teardown ends exactly the processes that head started (never
`ray stop`, which would stop every Ray on the machine) and checks that none is left.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from recycler.cluster.job_plan import DEFAULT_EXCLUDES, plan_job, staged_working_dir
from recycler.errors import RecyclerError

pytestmark = pytest.mark.timeout(600)

BIN = Path(sys.executable).parent
RAY = BIN / "ray"
START_TIMEOUT_S = 120
STRIPPED_ENV = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_JOB_HEADERS",
)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    env.update(extra)
    return env


@dataclass
class Head:
    url: str
    root: Path  # temp dir: ray/ (session files), home/ (token), logs
    token: str
    proc: subprocess.Popen[bytes]

    @property
    def home(self) -> Path:
        return self.root / "home"

    def client_env(self, **extra: str) -> dict[str, str]:
        """A submitter that finds the token in ~/.ray/auth_token (the default file)."""
        return clean_env(HOME=str(self.home), RAY_AUTH_MODE="token", **extra)

    def jobs(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        # An explicit header, whatever RAY_AUTH_MODE this test process has.
        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token}"})


def _family(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """Every process the head started: its descendants (job drivers start new sessions,
    so they are found by parentage) and anything in its session (reparented orphans)."""
    found: dict[int, psutil.Process] = {}
    try:
        leader = psutil.Process(proc.pid)
        found[leader.pid] = leader
        found.update({p.pid: p for p in leader.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                found.setdefault(p.pid, p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return [p for p in found.values() if p.is_running()]


def _stop_head(proc: subprocess.Popen[bytes]) -> list[str]:
    family = _family(proc)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node on SIGTERM
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        _kill(p)
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)
    left = [p for p in _family(proc) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return [" ".join(p.cmdline())[:120] for p in left]


def _kill(p: psutil.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        p.kill()


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # Short and outside pytest's tmp tree: Ray's socket paths must stay under ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rcy-", dir="/tmp"))
    (root / "home").mkdir()
    env = clean_env(
        HOME=str(root / "home"),
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        # The job's `python` is the one on the cluster's PATH: this venv's.
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    subprocess.run(
        [str(RAY), "get-auth-token", "--generate"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    token = (root / "home" / ".ray" / "auth_token").read_text().strip()
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics = free_ports(7)
    cmd = [
        str(RAY), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}", "--min-worker-port=0", "--max-worker-port=0",
        "--num-cpus=2", f"--temp-dir={root / 'ray'}",
    ]  # fmt: skip
    log = (root / "head.log").open("wb")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    "ray start exited "
                    f"{proc.returncode}:\n{(root / 'head.log').read_text()[-3000:]}"
                )
            request = urllib.request.Request(
                f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the Ray dashboard did not come up:\n{(root / 'head.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield Head(url=url, root=root, token=token, proc=proc)
    finally:
        left = _stop_head(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still running: {left}"


def recycler_cli(
    *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recycler.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("recycler: error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def demo_layout(folder: Path, zoo: Path, *, limit: int = 2) -> Path:
    """The demo's layout: the pool inside the study folder (here a link to the shared micro
    zoo, read-only), relative paths, a relative SQLite storage."""
    folder.mkdir(parents=True)
    (folder / "pool").symlink_to(zoo, target_is_directory=True)
    study = yaml.safe_load((zoo / "study.yaml").read_text())
    study["pool"] = {"base": "pool/base", "checkpoints": ["pool/checkpoints/*"]}
    study["eval"] = {**study["eval"], "tasks_dir": "pool/tasks", "limit": limit}
    study["storage"] = "sqlite:///results/study.db"
    (folder / "results").mkdir()
    (folder / "notes.txt").write_text("uploaded with the study\n")
    (folder / "scratch").mkdir()
    (folder / "scratch" / "big.bin").write_bytes(b"\0" * 1024)
    (folder / ".rayignore").write_text("scratch/\n")
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


# -- end to end on the cluster ----------------------------------------------------------


def test_submitted_study_runs_its_search_on_the_cluster(
    head: Head, micro_zoo: Path, tmp_path: Path
) -> None:
    study = demo_layout(tmp_path / "study", micro_zoo)
    proc = recycler_cli(
        "submit",
        str(study),
        "--address",
        head.url,
        "--n-trials",
        "1",
        "--follow",
        env=head.client_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.splitlines()[0]
    assert job_id.startswith("recycler-zoo-micro-"), proc.stdout
    # --follow streamed the job's own output: the search's summary line.
    assert "python -m recycler.cli search study.yaml --n-trials 1" in proc.stdout
    assert "study zoo-micro:" in proc.stdout and "1 complete" in proc.stdout, proc.stdout
    assert f"job {job_id} succeeded" in proc.stderr

    info = head.jobs().get_job_info(job_id)
    assert str(info.status) == "SUCCEEDED"
    assert info.metadata["recycler.study"] == "zoo-micro"

    # The search wrote its trials to the study's storage, on the (shared) disk.
    import optuna

    stored = optuna.load_study(
        study_name="zoo-micro", storage=f"sqlite:///{tmp_path / 'study' / 'results' / 'study.db'}"
    )
    complete = [t for t in stored.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 1

    # What was uploaded: the study file (paths absolute) and small files, no pool, no database.
    packages = list(
        (head.root / "ray" / "session_latest" / "runtime_resources" / "working_dir_files").glob(
            "_ray_pkg_*"
        )
    )
    uploaded = [
        p
        for p in packages
        if p.is_dir()
        and (p / "study.yaml").is_file()
        and yaml.safe_load((p / "study.yaml").read_text())["name"] == "zoo-micro"
    ]
    assert len(uploaded) == 1, packages
    pkg = uploaded[0]
    job_study = yaml.safe_load((pkg / "study.yaml").read_text())
    folder = (tmp_path / "study").resolve()
    assert job_study["pool"] == {
        "base": str(folder / "pool" / "base"),
        "checkpoints": [str(folder / "pool" / "checkpoints" / "*")],
    }
    assert job_study["storage"] == f"sqlite:///{folder / 'results' / 'study.db'}"
    assert job_study["eval"]["tasks_dir"] == "pool/tasks"
    files = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()}
    assert "notes.txt" in files and "pool/tasks/zoo_inc.yaml" in files
    assert not any(f.startswith(("pool/checkpoints/", "pool/base/", "scratch/")) for f in files), (
        sorted(files)
    )
    assert not any(f.endswith((".safetensors", ".db")) for f in files), sorted(files)


def test_a_job_that_fails_on_the_cluster_exits_non_zero(
    head: Head, micro_zoo: Path, tmp_path: Path
) -> None:
    # The real user's layout: the pool on shared storage by absolute path. This one is
    # not there, which only the cluster can tell: the job's search refuses the study.
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copytree(micro_zoo / "tasks", folder / "tasks")
    study = yaml.safe_load((micro_zoo / "study.yaml").read_text())
    study["pool"] = {
        "base": str(micro_zoo / "base"),
        "checkpoints": [str(tmp_path / "no-such-pool" / "*")],
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    proc = recycler_cli(
        "submit",
        str(folder / "study.yaml"),
        "--address",
        head.url,
        "--follow",
        env=head.client_env(),
    )
    line = one_error_line(proc)
    job_id = proc.stdout.splitlines()[0]
    assert line.startswith(
        # The job's copy of the study file names the key, as a local search does.
        f"recycler: error: job {job_id} failed on the cluster: study.yaml: pool.checkpoints:"
    ), line
    assert str(head.jobs().get_job_info(job_id).status) == "FAILED"


# -- token authentication ------------------------------------------------------------------


def test_missing_or_wrong_token_is_refused_with_one_line(head: Head, tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    study.write_text(yaml.safe_dump(minimal_study("/shared/pool/*")))
    before = len(head.jobs().list_jobs())
    empty_home = tmp_path / "home"
    empty_home.mkdir()

    token_env = clean_env(HOME=str(empty_home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    wrong = recycler_cli("submit", str(study), "--address", head.url, env=token_env)
    assert "refused the token from RAY_AUTH_TOKEN" in one_error_line(wrong)

    token_file = tmp_path / "wrong_token"
    token_file.write_text("1" * 64)
    file_env = clean_env(
        HOME=str(empty_home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file)
    )
    wrong_file = recycler_cli("submit", str(study), "--address", head.url, env=file_env)
    assert f"refused the token from RAY_AUTH_TOKEN_PATH ({token_file})" in one_error_line(
        wrong_file
    )

    # The right token, but RAY_AUTH_MODE unset: Ray's client sends no token at all.
    unsent_env = clean_env(HOME=str(head.home), RAY_AUTH_TOKEN=head.token)
    unsent = recycler_cli("submit", str(study), "--address", head.url, env=unsent_env)
    assert "requires token authentication: set RAY_AUTH_MODE=token" in one_error_line(unsent)

    none = recycler_cli(
        "submit",
        str(study),
        "--address",
        head.url,
        env=clean_env(HOME=str(empty_home), RAY_AUTH_MODE="token"),
    )
    assert "couldn't find an authentication token" in one_error_line(none)

    assert len(head.jobs().list_jobs()) == before, "a refused submission created a job"


# -- bad addresses, bad studies (no cluster needed) ----------------------------------------


def minimal_study(checkpoints: str) -> dict[str, Any]:
    return {
        "name": "tiny",
        "storage": "sqlite:////shared/studies/tiny.db",
        "pool": {"checkpoints": [checkpoints]},
        "objectives": [{"name": "a", "task": "t", "metric": "acc"}],
        "eval": {"tasks_dir": "tasks"},
    }


@pytest.fixture
def remote_study(tmp_path: Path) -> Path:
    (tmp_path / "tasks").mkdir()
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(minimal_study("/shared/pool/*")))
    return path


def test_unreachable_or_wrong_addresses_are_one_line(remote_study: Path) -> None:
    env = clean_env()
    closed = free_ports(1)[0]
    line = one_error_line(
        recycler_cli(
            "submit", str(remote_study), "--address", f"http://127.0.0.1:{closed}", env=env
        )
    )
    assert f"--address http://127.0.0.1:{closed}: cannot connect to 127.0.0.1:{closed}" in line
    line = one_error_line(
        recycler_cli("submit", str(remote_study), "--address", "ray://127.0.0.1:10001", env=env)
    )
    assert "give the Ray dashboard's http(s) address" in line and "ray://" in line
    line = one_error_line(
        recycler_cli("submit", str(remote_study), "--address", "http://127.0.0.1:notaport", env=env)
    )
    assert "--address http://127.0.0.1:notaport" in line


def test_an_http_server_that_is_not_ray_is_one_line(remote_study: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        line = one_error_line(
            recycler_cli("submit", str(remote_study), "--address", url, env=clean_env())
        )
        assert "no Ray job server there" in line, line
    finally:
        server.shutdown()
        server.server_close()


def test_study_is_validated_before_anything_is_sent(tmp_path: Path, remote_study: Path) -> None:
    env = clean_env()
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"  # never reached: the study fails first
    line = one_error_line(
        recycler_cli("submit", str(tmp_path / "nope.yaml"), "--address", closed, env=env)
    )
    assert "nope.yaml: no such study file" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**minimal_study("/shared/pool/*"), "serach": {}}))
    assert "serach: unknown key" in one_error_line(
        recycler_cli("submit", str(bad), "--address", closed, env=env)
    )
    line = one_error_line(
        recycler_cli("submit", str(remote_study), "--address", closed, "--n-trials", "0", env=env)
    )
    assert "--n-trials: must be at least 1" in line


# -- the plan: what the job reads and what is uploaded ----------------------------------------


def test_plan_makes_storage_paths_absolute_and_keeps_small_files_relative(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    (folder / "tasks").mkdir(parents=True)
    (folder / "zoo" / "checkpoints" / "a").mkdir(parents=True)
    (folder / "zoo" / "base").mkdir()
    outside = tmp_path / "pool-elsewhere"
    (outside / "b").mkdir(parents=True)
    study = {
        **minimal_study("zoo/checkpoints/*"),
        "storage": "sqlite:///recycler.db",
        "pool": {
            "base": "zoo/base",
            "checkpoints": ["zoo/checkpoints/*", "../pool-elsewhere/b", "/shared/c"],
        },
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    plan = plan_job(path, n_trials=3)
    job = yaml.safe_load(plan.study_text)
    root = folder.resolve()
    assert job["pool"] == {
        "base": str(root / "zoo" / "base"),
        "checkpoints": [
            str(root / "zoo" / "checkpoints" / "*"),
            str(outside.resolve() / "b"),
            "/shared/c",
        ],
    }
    assert job["storage"] == f"sqlite:///{root / 'recycler.db'}"
    assert job["eval"]["tasks_dir"] == "tasks"
    assert plan.entrypoint == "python -m recycler.cli search study.yaml --n-trials 3"
    for pattern in (
        "/zoo/checkpoints/*",
        "/zoo/base",
        "/recycler.db",
        "/recycler.db-wal",
        *DEFAULT_EXCLUDES,
    ):
        assert pattern in plan.ignore_patterns
    with staged_working_dir(plan) as stage:
        assert (stage / "study.yaml").read_text() == plan.study_text
        assert (stage / "tasks").is_symlink() and (stage / "zoo").resolve() == (
            folder / "zoo"
        ).resolve()
        assert "/zoo/base" in (stage / ".rayignore").read_text().splitlines()


def test_plan_refuses_relative_paths_that_are_not_here(tmp_path: Path, remote_study: Path) -> None:
    (tmp_path / "tasks").mkdir(exist_ok=True)
    path = tmp_path / "rel.yaml"
    path.write_text(yaml.safe_dump(minimal_study("zoo/*")))
    with pytest.raises(RecyclerError, match=r"pool.checkpoints: 'zoo/\*' matches nothing"):
        plan_job(path, n_trials=None)
    path.write_text(
        yaml.safe_dump({**minimal_study("/shared/pool/*"), "eval": {"tasks_dir": "missing"}})
    )
    with pytest.raises(RecyclerError, match=r"eval\.tasks_dir: no such folder"):
        plan_job(path, n_trials=None)
    # Absolute paths that only the cluster has are accepted, with a note.
    path.write_text(
        yaml.safe_dump({**minimal_study("/shared/pool/*"), "eval": {"tasks_dir": "/shared/tasks"}})
    )
    plan = plan_job(path, n_trials=None)
    assert any("/shared/tasks" in note and "assumed to be on the cluster" for note in plan.notes)
    assert yaml.safe_load(plan.study_text)["pool"]["checkpoints"] == ["/shared/pool/*"]
