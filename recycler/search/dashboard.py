"""`recycler dashboard`: optuna-dashboard on the study's storage (127.0.0.1 unless told)."""

from __future__ import annotations

from pathlib import Path

from recycler.config import load_study_spec
from recycler.errors import RecyclerError


def serve_dashboard(study_path: Path, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted. The storage must exist: the dashboard must not create it."""
    spec = load_study_spec(study_path)
    if not 0 < port < 65536:
        raise RecyclerError(f"--port: must be 1..65535, got {port}")
    sqlite = spec.sqlite_path
    if sqlite is not None and not sqlite.exists():
        raise RecyclerError(
            f"storage: no study yet ({sqlite} does not exist); run recycler search first"
        )
    import optuna
    from optuna_dashboard import run_server

    try:
        storage = optuna.storages.get_storage(spec.storage_url)
    except Exception as exc:
        raise RecyclerError(
            f"storage: cannot open {spec.storage}: {str(exc).splitlines()[0]}"
        ) from None
    print(
        f"optuna-dashboard for study {spec.name!r}: http://{host}:{port}/  (Ctrl-C to stop)",
        flush=True,
    )
    try:
        run_server(storage, host=host, port=port)
    except OSError as exc:
        raise RecyclerError(
            f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
