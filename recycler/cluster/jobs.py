"""The Ray job client: submit a planned study search (`job_plan`) through Ray's Job
Submission SDK and follow it.

The job's runtime_env: `working_dir`, the staged study folder (`job_plan`); and
`py_modules`, the `recycler` package this process runs from, so the job runs the same
recycler code as the submitter. The cluster's Python needs recycler's dependencies
(torch, transformers, lm-eval, optuna, ray[default]), e.g. `pip install recycler` in the
image; `ship_package=False` uses the cluster's installed recycler instead.

Token authentication (Ray ≥ 2.52): the client sends a token only when
`RAY_AUTH_MODE=token` is set in the submitter's environment; the token comes from
`RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`.
A missing, wrong or unsent token is one RecyclerError line, as are an unreachable server
and a refused request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

import recycler
from recycler import __version__
from recycler.cluster.job_plan import JobPlan, staged_working_dir
from recycler.errors import RecyclerError

# Applied to the shipped recycler package too (runtime_env `excludes` covers py_modules).
PACKAGE_EXCLUDES: tuple[str, ...] = ("__pycache__/", "*.pyc")
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_ERROR_PREFIX = "recycler: error: "


# -- the cluster -------------------------------------------------------------------------


def submit_job(
    plan: JobPlan, url: str, *, ship_package: bool = True
) -> tuple[JobSubmissionClient, str]:
    """Submit the planned job to the job server at `url`; the client and the job's id."""
    _quiet_ray_client_logs()
    with _talking_to(url):
        client = JobSubmissionClient(url)
        with staged_working_dir(plan) as stage:
            runtime_env: dict[str, Any] = {
                "working_dir": str(stage),
                "excludes": list(PACKAGE_EXCLUDES),
            }
            if ship_package:
                runtime_env["py_modules"] = [str(Path(recycler.__file__).resolve().parent)]
            job_id = client.submit_job(
                entrypoint=plan.entrypoint,
                submission_id=_submission_id(plan.spec.name),
                runtime_env=runtime_env,
                metadata={
                    "recycler.study": plan.spec.name,
                    "recycler.study_file": str(plan.root / plan.study_name),
                    "recycler.version": __version__,
                },
            )
    return client, job_id


def follow_job(client: JobSubmissionClient, job_id: str, url: str) -> None:
    """Stream a job's logs to stdout until it ends; return if it succeeded, exit non-zero if not
    (RecyclerError when the search on the cluster refused the study)."""
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


@contextlib.contextmanager
def _talking_to(url: str) -> Iterator[None]:
    """Ray client failures (network, authentication, a refused request) → one RecyclerError line."""
    try:
        yield
    except AuthenticationError as exc:
        raise RecyclerError(_auth_message(exc, url)) from None
    except (ConnectionError, requests.RequestException) as exc:
        raise RecyclerError(f"{url}: cannot reach the Ray job server: {_first_line(exc)}") from None
    except RuntimeError as exc:
        text = _first_line(exc)
        if "Version check returned 404" in text:
            raise RecyclerError(
                f"{url}: no Ray job server there (is it the dashboard's port, 8265?)"
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
        return (
            f"{url}: the Ray cluster refused the token from {_token_source()}: "
            "it is not this cluster's token"
        )
    if raw.startswith("Authentication required"):  # HTTP 401
        if mode != "token":
            return (
                f"{url}: the Ray cluster requires token authentication: set RAY_AUTH_MODE=token "
                "and give the "
                "cluster's token in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or "
                "~/.ray/auth_token"
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
