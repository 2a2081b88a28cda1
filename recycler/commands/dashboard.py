"""`recycler dashboard STUDY.yaml [--host H] [--port P]`: optuna-dashboard on the study's
storage (127.0.0.1 unless told)."""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna
from optuna_dashboard import run_server

from recycler.commands._args import port
from recycler.config import load_study_spec
from recycler.errors import RecyclerError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=8080)


def run(args: argparse.Namespace) -> None:
    """Serve until interrupted. The storage must exist: the dashboard must not create it."""
    spec = load_study_spec(args.study)
    sqlite = spec.sqlite_path
    if sqlite is not None and not sqlite.exists():
        raise RecyclerError(
            f"storage: no study yet ({sqlite} does not exist); run recycler search first"
        )
    try:
        storage = optuna.storages.get_storage(spec.storage_url)
    except Exception as exc:
        raise RecyclerError(
            f"storage: cannot open {spec.storage}: {str(exc).splitlines()[0]}"
        ) from None
    host, port_number = args.host, args.port
    print(
        f"optuna-dashboard for study {spec.name!r}: http://{host}:{port_number}/  (Ctrl-C to stop)",
        flush=True,
    )
    try:
        run_server(storage, host=host, port=port_number)
    except OSError as exc:
        raise RecyclerError(
            f"--port: cannot listen on {host}:{port_number}: {exc.strerror or exc}"
        ) from None
