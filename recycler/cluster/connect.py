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
import signal
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


class _Connection:
    """A `ray.init` under way in its helper thread (see the module doc)."""

    def __init__(self, address: str | None, timeout_s: float) -> None:
        self.address, self.timeout_s = address, timeout_s
        self.target = resolve_address(address)
        self.tried = describe(address, self.target)
        self.started = time.monotonic()
        self.failure: list[BaseException] = []
        self.done = threading.Event()
        self.release = threading.Event()
        endpoint = host_port(self.target)
        if endpoint is not None:
            why = probe(*endpoint, timeout_s=min(timeout_s, 10.0))
            if why is not None:
                raise RecyclerError(
                    f"cluster.address: cannot connect to Ray at {self.tried}: {why}"
                )
        kwargs: dict[str, Any] = {
            "namespace": RAY_NAMESPACE,
            "log_to_driver": False,  # lm-eval's per-trial logging would drown the progress bar
            "logging_level": logging.WARNING,
        }
        if self.target == "local":
            # A local cluster: no Ray dashboard server (recycler has optuna-dashboard for that).
            kwargs["include_dashboard"] = False
        self._quiet = _DropNotMainThreadWarning()
        logging.getLogger("ray._private.worker").addFilter(self._quiet)
        threading.Thread(
            target=self._init, args=(kwargs,), name="recycler-ray-init", daemon=True
        ).start()

    def _init(self, kwargs: dict[str, Any]) -> None:
        try:
            ray.init(address=self.target, **kwargs)
        except BaseException as exc:  # reported by the waiting thread
            self.failure.append(exc)
            return
        finally:
            self.done.set()
        # The processes of a local cluster die with the thread that started them (Ray
        # starts them with PR_SET_PDEATHSIG): this one stays until stop_ray.
        self.release.wait()

    def wait(self) -> None:
        """Until Ray is up, at most what is left of timeout_s; one error line otherwise."""
        try:
            # A lock wait: a signal's handler runs (and raises) here at once.
            self.done.wait(max(0.0, self.timeout_s - (time.monotonic() - self.started)))
        finally:
            logging.getLogger("ray._private.worker").removeFilter(self._quiet)
        if not self.done.is_set():  # Ray's connection cannot be cancelled: leave at once
            raise UnreachableError(
                f"cluster.address: Ray at {self.tried} did not answer within "
                f"{self.timeout_s:g} s (cluster.connect_timeout_s); is the cluster up?"
            )
        if self.failure:
            reason = str(self.failure[0]).strip().splitlines()
            raise RecyclerError(
                f"cluster.address: cannot connect to Ray at {self.tried}: "
                f"{reason[0] if reason else type(self.failure[0]).__name__}"
            )
        _holders.append(self.release)
        _reclaim_sigterm()


def check_local_gpus(address: str | None, gpus_per_worker: float, workers: int) -> None:
    """A local cluster asked for GPUs this machine lacks: one line before Ray starts (Ray
    would start, then wait forever for the GPUs)."""
    if address is not None or resolve_address(None) != "local" or gpus_per_worker <= 0:
        return
    import torch  # only when GPUs are asked for: the CPU path need not wait for it here

    have = torch.cuda.device_count()
    if gpus_per_worker * workers > have:
        raise RecyclerError(
            f"cluster.gpus_per_worker: {workers} worker(s) × {gpus_per_worker:g} GPU need "
            f"{gpus_per_worker * workers:g} GPUs; this machine has {have}"
        )


# Ray's notes that say nothing to a recycler user (the local cluster's token authentication).
_RAY_NOISE_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
_quiet = [False]


def quiet_ray() -> None:
    """Keep Ray's noise off the terminal (the `recycler` command's default; `-v` keeps it):
    its token-authentication note, and the C++ stack dump its core worker's failure handler
    prints on SIGTERM before the command's own handler runs."""
    for name in _RAY_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet[0] = True


def _reclaim_sigterm() -> None:
    # ray.init installs a C++ SIGTERM handler over Python's; setting the Python handler
    # again (it is still in Python's table) puts Python's C handler back. Main thread only.
    if _quiet[0] and threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGTERM)
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


_early: list[_Connection] = []  # a connection begun by begin_ray, not yet waited for


def begin_ray(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Start connecting to (or starting) Ray now, in the background, while the caller does
    other work (a search checks its study and indexes its pool meanwhile); `start_ray`
    with the same address then waits for it. A failure is reported there. True when it
    began one (then the caller's `stop_ray` ends it, whatever happens)."""
    if ray.is_initialized() or _early:
        return False
    _early.append(_Connection(address, timeout_s))
    return True


def start_ray(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """Connect to (address) or start (None) a Ray cluster within timeout_s; True when this
    call initialised Ray (then the caller shuts it down), False when it already was."""
    early = _early.pop() if _early else None
    if early is not None and early.address == address:
        early.wait()
        return True
    if early is not None:  # begun for another address: let it finish, then drop it
        early.done.wait(early.timeout_s)
        stop_ray()
    if ray.is_initialized():
        return False
    _Connection(address, timeout_s).wait()
    return True


def stop_ray(*, leaving: bool = False) -> None:
    """Shut down the Ray that start_ray (or begin_ray) initialised (its local cluster, if it
    started one). `leaving`: the process is ending (a signal); a connection still under way
    is not waited for, its processes end with this one."""
    while _early:  # begun and never waited for (the search stopped before its workers)
        early = _early.pop()
        if leaving and not early.done.is_set():
            return
        early.done.wait(early.timeout_s)
        _holders.append(early.release)
    ray.shutdown()
    while _holders:
        _holders.pop().set()
