"""Connecting a search to Ray: which cluster, and never a wait without end.

`cluster.address`:
- null: a cluster of this process's own (`ray.init(address="local")`), whatever a `ray
  start` recorded in Ray's temp folder: a crashed one leaves its address there, and
  `ray.init()` with no address would attach to it and retry it forever. Inside a Ray
  job the job's cluster (Ray's job supervisor names it in RAY_ADDRESS; so may a user).
- "auto": the cluster `ray start` started on this machine (Ray's own resolution).
- "HOST:PORT" (the head's GCS) or "ray://HOST:PORT" (Ray Client): that cluster.
An http(s):// address is a Ray dashboard's, refused by the study file's validation:
`recycler submit` takes it.

`ray.init` runs in a helper thread while the main thread waits for it, at most
`cluster.connect_timeout_s`: Ray's connection to a GCS that does not answer blocks in
native code for tens of seconds at a time, where no signal handler runs, and retries
forever. The main thread's wait is a lock wait, in which a SIGTERM's or Ctrl-C's
handler runs at once. The helper thread lives until `stop_ray`, as the processes of a
local cluster end with the thread that started them. A given HOST:PORT is first probed
with a plain TCP connect, so a refused or unreachable address fails at once with the
system's reason.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import ray

from recycler.config import CONNECT_TIMEOUT_S
from recycler.errors import RecyclerError, UnreachableError

RAY_NAMESPACE = "recycler"
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # read by ray.init itself for "auto"; we read it for null

_holders: list[threading.Event] = []  # each releases a thread that holds this process's Ray


def resolve_address(address: str | None) -> str:
    """What `ray.init(address=...)` is given for a `cluster.address`."""
    if address is None:
        return os.environ.get(RAY_ADDRESS_ENV) or "local"
    return address


def describe(address: str | None, target: str) -> str:
    """How the error line names what was tried."""
    if address is None:
        return (
            "a local cluster of its own"
            if target == "local"
            else f"{target} (from {RAY_ADDRESS_ENV})"
        )
    if address == "auto":
        return "the cluster started on this machine by `ray start` (auto)"
    return target


def host_port(target: str) -> tuple[str, int] | None:
    """(host, port) of a concrete "HOST:PORT" or "ray://HOST:PORT"; None for "local"/"auto"."""
    rest = target.removeprefix("ray://")
    if "://" in rest or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def probe(host: str, port: int, timeout_s: float) -> str | None:
    """None when something accepts a TCP connection at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


class _DropNotMainThreadWarning(logging.Filter):
    """Ray warns that it sets no SIGTERM handler off the main thread: by design here (the
    `recycler` command's own handler stays in place)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not the main thread" not in record.getMessage()


def start_ray(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Connect to (address) or start (None) a Ray cluster within timeout_s; True when this
    call initialised Ray (then the caller shuts it down), False when it already was."""
    if ray.is_initialized():
        return False
    target = resolve_address(address)
    tried = describe(address, target)
    started = time.monotonic()
    endpoint = host_port(target)
    if endpoint is not None:
        why = probe(*endpoint, timeout_s=min(timeout_s, 10.0))
        if why is not None:
            raise RecyclerError(f"cluster.address: cannot connect to Ray at {tried}: {why}")
    kwargs: dict[str, Any] = {
        "namespace": RAY_NAMESPACE,
        "log_to_driver": False,  # lm-eval's per-trial logging would drown the progress bar
        "logging_level": logging.WARNING,
    }
    if target == "local":
        # A local cluster: no Ray dashboard server (recycler has optuna-dashboard for that).
        kwargs["include_dashboard"] = False
    failure: list[BaseException] = []
    done = threading.Event()
    release = threading.Event()

    def init() -> None:
        try:
            ray.init(address=target, **kwargs)
        except BaseException as exc:  # reported by the waiting thread
            failure.append(exc)
            return
        finally:
            done.set()
        # The processes of a local cluster die with the thread that started them (Ray
        # starts them with PR_SET_PDEATHSIG): this one stays until stop_ray.
        release.wait()

    worker_log = logging.getLogger("ray._private.worker")
    quiet = _DropNotMainThreadWarning()
    worker_log.addFilter(quiet)
    thread = threading.Thread(target=init, name="recycler-ray-init", daemon=True)
    try:
        thread.start()
        # A lock wait: a signal's handler runs (and raises) here at once.
        done.wait(max(0.0, timeout_s - (time.monotonic() - started)))
    finally:
        worker_log.removeFilter(quiet)
    if not done.is_set():  # Ray's connection cannot be cancelled: the command leaves at once
        raise UnreachableError(
            f"cluster.address: Ray at {tried} did not answer within {timeout_s:g} s "
            "(cluster.connect_timeout_s); is the cluster up?"
        )
    if failure:
        reason = str(failure[0]).strip().splitlines()
        raise RecyclerError(
            f"cluster.address: cannot connect to Ray at {tried}: "
            f"{reason[0] if reason else type(failure[0]).__name__}"
        )
    _holders.append(release)
    return True


def stop_ray() -> None:
    """Shut down the Ray that start_ray initialised (its local cluster, if it started one)."""
    ray.shutdown()
    while _holders:
        _holders.pop().set()
