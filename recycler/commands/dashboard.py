"""`recycler dashboard STUDY.yaml [--host H] [--port P]`: optuna-dashboard on the study's
storage (127.0.0.1 unless told).

The HTTP server runs in a thread of its own and the main thread only waits for it.
A signal's handler runs in the main thread: had the server run there, a SIGTERM
(raised as SystemExit by the `recycler` command) or Ctrl-C landing while a request is
handled would be raised inside wsgiref's request handler, whose catch-all reports it
as that request's error and serves on, so the signal would be lost. Raised in the
waiting main thread instead, it stops the server (after the request in hand) and
the process ends.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from optuna_dashboard import wsgi

from recycler.commands._args import port
from recycler.config import load_study_spec
from recycler.errors import RecyclerError
from recycler.search.storage import open_existing


class _QuietHandler(WSGIRequestHandler):
    """No access log line per request: the dashboard's page polls every few seconds."""

    # A client that stops reading or sending is dropped after this many seconds, so the
    # request in hand, which stopping the server waits for, cannot hold it forever.
    timeout = 5

    def log_message(self, format: str, *args: Any) -> None:
        pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=8080)


def run(args: argparse.Namespace) -> None:
    """Serve until interrupted. The storage must exist: the dashboard must not create it."""
    spec = load_study_spec(args.study)
    storage = open_existing(spec)
    host, port_number = args.host, args.port
    try:
        server = make_server(
            host, port_number, wsgi(storage), server_class=WSGIServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise RecyclerError(
            f"--port: cannot listen on {host}:{port_number}: {exc.strerror or exc}"
        ) from None
    print(
        f"optuna-dashboard for study {spec.name!r}: http://{host}:{port_number}/  (Ctrl-C to stop)",
        flush=True,
    )
    serve_until_signal(server)


def serve_until_signal(server: WSGIServer) -> None:
    """Serve in a thread until the main thread is interrupted (by a signal's exception),
    then stop the server and close its socket."""
    thread = threading.Thread(target=server.serve_forever, name="recycler-dashboard", daemon=True)
    thread.start()
    try:
        # Short sleeps, not one long wait (a join): the kernel may hand the signal to the
        # server thread, and Python then runs its handler in the main thread only when that
        # wakes up; an interrupted join on Python 3.11 also marks the live thread stopped.
        while thread.is_alive():
            time.sleep(0.2)
    finally:
        server.shutdown()  # returns once the request in hand is answered
        server.server_close()
