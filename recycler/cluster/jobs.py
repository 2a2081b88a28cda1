"""`recycler submit STUDY.yaml --address http://HEAD:8265`: run a study's search as a Ray job.

The job runs `python -m recycler.cli search STUDY.yaml [--n-trials N]` on the cluster,
through Ray's Job Submission SDK, with this runtime_env:

- `working_dir`: the study's folder, minus everything heavy. It carries the study file
  and the small files beside it (the lm-eval task folder, a `.rayignore`). It never
  carries the pool or the study's database: those live on storage the cluster shares.
  Paths the study file gives for them (`pool.checkpoints`, `pool.base`, a SQLite
  `storage`) are made absolute in the job's copy of the study file, so a relative
  path means "this folder, at the same path on the cluster": true for a local cluster
  and for a study folder on a shared filesystem. For a remote cluster without one,
  write absolute cluster paths (and an RDB URL or an absolute SQLite file on shared
  storage) in the study file. Upload excludes, in order: Ray's defaults; weight files,
  databases, caches and VCS folders; every pool path and the SQLite file inside the
  folder; the patterns of a `.rayignore` (and `.gitignore`) in the folder, which Ray
  honours, and `excludes=` for library callers.
- `py_modules`: the `recycler` package this command runs from, so the job runs the same
  recycler code as the submitter. The cluster's Python needs recycler's dependencies
  (torch, transformers, lm-eval, optuna, ray[default]), e.g. `pip install recycler` in
  the image; `ship_package=False` uses the cluster's installed recycler instead.

Token authentication (Ray ≥ 2.52): the client sends a token only when
`RAY_AUTH_MODE=token` is set in the submitter's environment; the token comes from
`RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`.
A missing, wrong or unsent token is one `recycler: error:` line (exit 2), as are an
unreachable or wrong address.

The job id goes to stdout (alone, so `JOB=$(recycler submit …)` works); notes go to
stderr. `--follow` streams the job's logs to stdout until it ends; a failed or stopped
job exits non-zero (2 when the search on the cluster refused the study, else 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import secrets
import shlex
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recycler import __version__
from recycler.config import StudySpec, load_study_spec, resolve_storage_url
from recycler.errors import RecyclerError

# Never uploaded with the working_dir: weights (the pool is read from shared storage),
# databases (the study's storage lives on the cluster), caches and VCS folders.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.pyc",
    ".mypy_cache/",
    ".ruff_cache/",
    ".pytest_cache/",
    ".ipynb_checkpoints/",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.onnx",
    "*.h5",
    "*.msgpack",
    "*.db",
    "*.db-journal",
    "*.db-wal",
    "*.db-shm",
    "*.sqlite",
    "*.sqlite3",
)
# Applied to the shipped recycler package too (runtime_env `excludes` covers py_modules).
PACKAGE_EXCLUDES: tuple[str, ...] = ("__pycache__/", "*.pyc")
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
CONNECT_TIMEOUT_S = 10.0
_ERROR_PREFIX = "recycler: error: "


@dataclass
class JobPlan:
    """Everything `submit_study` sends, computed without touching the cluster."""

    root: Path  # the study's folder: the working_dir's source
    study_name: str  # the study file's name: the job reads it from its working_dir
    study_text: str  # the job's copy of the study file (pool/storage paths absolute)
    ignore_patterns: list[str]  # written to the working_dir's .rayignore
    entrypoint: str
    spec: StudySpec
    notes: list[str] = field(default_factory=list)


# -- the plan: validation, the job's study file, the excludes ---------------------------


def plan_job(study_path: Path, *, n_trials: int | None, excludes: Sequence[str] = ()) -> JobPlan:
    """Validate the study file and work out the job's working_dir and entrypoint."""
    if n_trials is not None and n_trials < 1:
        raise RecyclerError(f"--n-trials: must be at least 1, got {n_trials}")
    spec, data, notes = _validated_study(study_path)
    root = spec.root
    ignore = list(DEFAULT_EXCLUDES)
    job_data = dict(data)

    pool = dict(job_data["pool"])
    checkpoints: list[str] = []
    for entry in pool["checkpoints"]:
        text = str(entry)
        path, inside = _stays_on_storage(text, root)
        if path is not None and not _exists(path):
            what = "matches nothing" if _is_glob(text) else "does not exist"
            raise RecyclerError(
                f"{study_path}: pool.checkpoints: {text!r} {what} under {root} "
                "(a relative pool path is read on the cluster at this same absolute path)"
            )
        if inside is not None:
            ignore.append(inside)
        checkpoints.append(text if path is None else path)
    pool["checkpoints"] = checkpoints
    if pool.get("base") is not None:
        text = str(pool["base"])
        path, inside = _stays_on_storage(text, root, literal=True)
        if path is not None and not Path(path).exists():
            raise RecyclerError(f"{study_path}: pool.base: no such checkpoint: {path}")
        if inside is not None:
            ignore.append(inside)
        pool["base"] = text if path is None else path
    job_data["pool"] = pool

    storage = str(job_data.get("storage", spec.storage))
    resolved = resolve_storage_url(storage, root)
    if resolved != storage:
        job_data["storage"] = resolved
        notes.append(
            f"storage: the job writes the study to {resolved.removeprefix('sqlite:///')}: "
            "the cluster must see that path (a local cluster or a shared filesystem)"
        )
    db = spec.sqlite_path
    if db is not None:
        rel = _relative_inside(db, root)
        if rel is not None:
            ignore.extend(_literal(rel) + suffix for suffix in ("", "-journal", "-wal", "-shm"))

    tasks = spec.eval.tasks_dir
    relative = not tasks.is_absolute() and not str(tasks).startswith("~")
    if relative and _relative_inside(root / tasks, root) is None:
        # Outside the folder, so not uploaded: read it where it is.
        outside = _norm(root / tasks)
        job_data["eval"] = {**job_data["eval"], "tasks_dir": str(outside)}
        notes.append(f"eval.tasks_dir: outside the study folder, read on the cluster at {outside}")

    ignore.extend(str(p) for p in excludes)
    header = (
        f"# The job's copy of {study_path.resolve()}, written by recycler submit {__version__}:\n"
        "# pool and storage paths are absolute, so they are read from the cluster's storage.\n"
    )
    study_text = header + yaml.safe_dump(job_data, sort_keys=False)
    args = ["python", "-m", "recycler.cli", "search", study_path.name]
    if n_trials is not None:
        args += ["--n-trials", str(n_trials)]
    if spec.cluster.address not in (None, "auto"):
        notes.append(
            f"cluster.address is {spec.cluster.address!r}: the job's search connects there, "
            "not to the cluster it runs on"
        )
    return JobPlan(
        root=root,
        study_name=study_path.name,
        study_text=study_text,
        ignore_patterns=ignore,
        entrypoint=shlex.join(args),
        spec=spec,
        notes=notes,
    )


def _validated_study(path: Path) -> tuple[StudySpec, dict[str, Any], list[str]]:
    """The study, its YAML mapping, and notes; RecyclerError naming the key otherwise.

    `load_study_spec` also checks that `eval.tasks_dir` and the SQLite file's folder exist
    here. A remote cluster may hold an absolute one that this machine does not: that is
    accepted with a note. A relative one must exist here, since it is uploaded or read
    at this same path.
    """
    try:
        spec = load_study_spec(path)
    except RecyclerError as exc:
        spec = _schema_only(path, exc)
        remote = []
        tasks = spec.eval.tasks_dir
        if not spec.tasks_dir.is_dir():
            if not (tasks.is_absolute() or str(tasks).startswith("~")):
                raise
            remote.append(f"eval.tasks_dir {tasks}")
        db = spec.sqlite_path
        if db is not None and not db.parent.is_dir():
            if not _is_absolute_sqlite(spec.storage):
                raise
            remote.append(f"storage folder {db.parent}")
        if not remote:
            raise
        notes = [f"{what} is not on this machine: assumed to be on the cluster" for what in remote]
    else:
        notes = []
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return spec, data, notes


def _schema_only(path: Path, error: RecyclerError) -> StudySpec:
    """The study validated without looking at the disk; `error` again if that fails too."""
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "root" in data:
            raise error
        return StudySpec.model_validate({**data, "root": path.resolve().parent})
    except (OSError, yaml.YAMLError, ValidationError):
        raise error from None


def _is_absolute_sqlite(url: str) -> bool:
    return url.startswith("sqlite:////")


def _stays_on_storage(
    text: str, root: Path, *, literal: bool = False
) -> tuple[str | None, str | None]:
    """(absolute path for the job's study or None if already absolute, .rayignore pattern or None)."""
    if Path(text).is_absolute() or text.startswith("~"):
        return None, None
    absolute = str(_norm(root / text))
    rel = _relative_inside(Path(absolute), root)
    if rel is None:
        return absolute, None
    return absolute, _literal(rel) if literal else "/" + rel


def _norm(path: Path) -> Path:
    return Path(os.path.normpath(path))


def _relative_inside(path: Path, root: Path) -> str | None:
    """`path` relative to `root` (posix) if it lies inside it, else None."""
    try:
        rel = _norm(path).relative_to(_norm(root))
    except ValueError:
        return None
    return None if str(rel) == "." else rel.as_posix()


def _literal(rel: str) -> str:
    """A path as an anchored gitwildmatch pattern that matches only itself."""
    return "/" + re.sub(r"([*?\[\]\\!#])", r"\\\1", rel)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")  # as recycler.pool expands them


def _exists(pattern: str) -> bool:
    return bool(glob.glob(pattern)) if _is_glob(pattern) else Path(pattern).exists()


@contextlib.contextmanager
def staged_working_dir(plan: JobPlan) -> Iterator[Path]:
    """A temporary working_dir: the study folder's entries (symlinked), the job's study file
    and a .rayignore. Ray follows the links when it packs the folder, and prunes what the
    .rayignore (the user's patterns appended) excludes, so nothing heavy is read or sent."""
    with tempfile.TemporaryDirectory(prefix="recycler-submit-") as tmp:
        stage = Path(tmp) / "study"
        stage.mkdir()
        user_ignore = plan.root / ".rayignore"
        for entry in sorted(plan.root.iterdir()):
            if entry.name in (plan.study_name, ".rayignore"):
                continue
            (stage / entry.name).symlink_to(entry)
        (stage / plan.study_name).write_text(plan.study_text, encoding="utf-8")
        lines = ["# written by recycler submit", *plan.ignore_patterns]
        if user_ignore.is_file():
            lines += [
                "# from the study folder's .rayignore",
                *user_ignore.read_text(encoding="utf-8").splitlines(),
            ]
        (stage / ".rayignore").write_text("\n".join(lines) + "\n", encoding="utf-8")
        yield stage


# -- the cluster -------------------------------------------------------------------------


def submit_study(
    study_path: Path,
    *,
    address: str,
    follow: bool,
    n_trials: int | None,
    excludes: Sequence[str] = (),
    ship_package: bool = True,
) -> None:
    """`recycler submit STUDY.yaml --address URL [--follow] [--n-trials N]`."""
    plan = plan_job(study_path, n_trials=n_trials, excludes=excludes)
    url = _check_address(address)
    for note in plan.notes:
        print(f"recycler: note: {note}", file=sys.stderr)

    from ray.job_submission import JobSubmissionClient

    _quiet_ray_client_logs()
    with _talking_to(url):
        client = JobSubmissionClient(url)
        with staged_working_dir(plan) as stage:
            runtime_env: dict[str, Any] = {
                "working_dir": str(stage),
                "excludes": list(PACKAGE_EXCLUDES),
            }
            if ship_package:
                import recycler

                runtime_env["py_modules"] = [str(Path(recycler.__file__).resolve().parent)]
            job_id = client.submit_job(
                entrypoint=plan.entrypoint,
                submission_id=_submission_id(plan.spec.name),
                runtime_env=runtime_env,
                metadata={
                    "recycler.study": plan.spec.name,
                    "recycler.study_file": str(study_path.resolve()),
                    "recycler.version": __version__,
                },
            )
    print(job_id, flush=True)
    print(
        f"recycler: submitted study {plan.spec.name!r} as Ray job {job_id} to {url}\n"
        f"recycler: logs: ray job logs --follow {job_id} --address {url}; "
        f"stop: ray job stop {job_id} --address {url}",
        file=sys.stderr,
        flush=True,
    )
    if follow:
        follow_job(client, job_id, url)


def follow_job(client: Any, job_id: str, url: str) -> None:
    """Stream a job's logs to stdout until it ends; return if it succeeded, exit non-zero if not."""
    import aiohttp

    print(
        "recycler: following the job's logs (Ctrl-C stops following, not the job)",
        file=sys.stderr,
        flush=True,
    )
    with _talking_to(url):
        try:
            asyncio.run(_tail(client, job_id))
        except (RuntimeError, OSError, aiohttp.ClientError) as exc:
            # The log stream broke (a proxy closing websockets, a restart): poll instead.
            print(
                f"recycler: note: log stream lost ({exc}); waiting for the job to end",
                file=sys.stderr,
            )
        info = client.get_job_info(job_id)
        while str(info.status) not in TERMINAL_STATES:
            time.sleep(1.0)
            info = client.get_job_info(job_id)
        status = str(info.status)
        if status == "SUCCEEDED":
            print(f"recycler: job {job_id} succeeded", file=sys.stderr)
            return
        exit_code = getattr(info, "driver_exit_code", None)
        refused = _remote_error(client.get_job_logs(job_id)) if exit_code == 2 else None
    if refused is not None:
        raise RecyclerError(f"job {job_id} failed on the cluster: {refused}")
    message = (info.message or "").strip().splitlines()
    reason = f": {message[0]}" if message else ""
    print(f"recycler: job {job_id} {status.lower()}{reason}", file=sys.stderr)
    raise SystemExit(1)


async def _tail(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _remote_error(logs: str) -> str | None:
    """The last `recycler: error: …` line of a job's logs (the search refusing the study)."""
    found = [line for line in logs.splitlines() if line.startswith(_ERROR_PREFIX)]
    return found[-1].removeprefix(_ERROR_PREFIX).strip() if found else None


def _quiet_ray_client_logs() -> None:
    """Ray's job client logs each packaging step at INFO; keep its warnings (large files)."""
    for name in (
        "ray._private.runtime_env.packaging",
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


def _submission_id(study_name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", study_name).strip("-")[:40] or "study"
    return f"recycler-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _check_address(address: str) -> str:
    """The job server's URL; RecyclerError if it is malformed or nothing listens there.

    A TCP connect with a timeout first: Ray's client has none, and would wait for the
    system's (minutes) on an address that drops packets. Skipped where a proxy applies.
    """
    text = address.strip().rstrip("/")
    if not text:
        raise RecyclerError(
            "--address: empty; give the Ray dashboard's address, e.g. http://HEAD:8265"
        )
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        hint = (
            " (ray:// is the Ray Client port, not the job server)" if parts.scheme == "ray" else ""
        )
        raise RecyclerError(
            f"--address {address}: give the Ray dashboard's http(s) address, e.g. http://HEAD:8265{hint}"
        )
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RecyclerError(f"--address {address}: {exc}") from None
    if not host:
        raise RecyclerError(f"--address {address}: no host name")
    proxied = parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)
    if not proxied:
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                pass
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise RecyclerError(
                f"--address {address}: cannot connect to {host}:{port}: {why}"
            ) from None
    return text


@contextlib.contextmanager
def _talking_to(url: str) -> Iterator[None]:
    """Ray client failures (network, authentication, a refused request) → one RecyclerError line."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise RecyclerError(_auth_message(exc, url)) from None
    except (ConnectionError, requests.RequestException) as exc:
        raise RecyclerError(
            f"--address {url}: cannot reach the Ray job server: {_first_line(exc)}"
        ) from None
    except RuntimeError as exc:
        text = _first_line(exc)
        if "Version check returned 404" in text:
            raise RecyclerError(
                f"--address {url}: no Ray job server there (is it the dashboard's port, 8265?)"
            ) from None
        raise RecyclerError(f"{url}: the Ray job server refused the request: {text}") from None
    except ValueError as exc:
        # Ray's packaging refuses a working_dir over its size limit (512 MiB) with a ValueError.
        raise RecyclerError(
            f"cannot package the study folder for Ray: {_first_line(exc)}"
        ) from None


def _auth_message(exc: Exception, url: str) -> str:
    raw = str(getattr(exc, "message", "") or exc)
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if raw.startswith("Authentication failed"):  # HTTP 403
        return f"{url}: the Ray cluster refused the token from {_token_source()}: it is not this cluster's token"
    if raw.startswith("Authentication required"):  # HTTP 401
        if mode != "token":
            return (
                f"{url}: the Ray cluster requires token authentication: set RAY_AUTH_MODE=token and give the "
                "cluster's token in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
            )
        return f"{url}: the Ray cluster asked for a token and none was sent ({_first_line(raw)})"
    return f"{url}: Ray token authentication: {_first_line(raw)}"


def _token_source() -> str:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return "~/.ray/auth_token"


def _first_line(exc: object) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
