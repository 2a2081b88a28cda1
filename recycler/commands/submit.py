"""`recycler submit STUDY.yaml --address http://HEAD:8265 [--follow] [--n-trials N]`: run a
study's search as a Ray job (`cluster.job_plan` plans it, `cluster.jobs` sends it).

The job id goes to stdout (alone, so `JOB=$(recycler submit …)` works); notes go to
stderr. `--follow` streams the job's logs to stdout until it ends; a failed or stopped
job exits non-zero (2 when the search on the cluster refused the study, else 1).
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from recycler.cluster.job_plan import plan_job
from recycler.cluster.jobs import follow_job, submit_job
from recycler.commands._args import positive_int
from recycler.errors import RecyclerError

# How long the address's TCP connect may take before it is called unreachable (seconds).
CONNECT_TIMEOUT_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", type=Path)
    parser.add_argument(
        "--address", required=True, help="the Ray dashboard address, e.g. http://HEAD:8265"
    )
    parser.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    parser.add_argument("--n-trials", type=positive_int, default=None)


def run(args: argparse.Namespace) -> None:
    # The study first: a bad study file is reported before any address is tried.
    plan = plan_job(args.study, n_trials=args.n_trials)
    url = check_address(args.address)
    for note in plan.notes:
        print(f"recycler: note: {note}", file=sys.stderr)
    client, job_id = submit_job(plan, url)
    print(job_id, flush=True)
    print(
        f"recycler: submitted study {plan.spec.name!r} as Ray job {job_id} to {url}\n"
        f"recycler: logs: ray job logs --follow {job_id} --address {url}; "
        f"stop: ray job stop {job_id} --address {url}",
        file=sys.stderr,
        flush=True,
    )
    if args.follow:
        follow_job(client, job_id, url)


def check_address(address: str) -> str:
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
