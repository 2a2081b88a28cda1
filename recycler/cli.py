"""The `recycler` command: maps each subcommand's name to its module in `recycler.commands`.

Exit codes: 0 success; 2 bad input or configuration (one line `recycler: error: ...`
on stderr, no traceback); 1 an internal fault. Only `python -m recycler` (`__main__.py`)
imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import recycler
from recycler import __version__
from recycler.errors import RecyclerError, UnreachableError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same single line as every other input error."""

    def error(self, message: str) -> NoReturn:
        raise RecyclerError(f"{self.prog.removeprefix('recycler').strip() or 'usage'}: {message}")


# name (of its module in recycler.commands) -> one line of help. Only the module of the command
# being run is imported: `recycler --help`, a mistyped flag or a linear `recycler merge`
# must not wait for PyTorch, Ray or lm-eval, which other commands load.
COMMANDS: dict[str, str] = {
    "merge": "Merge checkpoints with a mergekit-style recipe into a HF model directory.",
    "fisher": "Estimate a checkpoint's diagonal Fisher from a text/jsonl file; "
    "writes fisher.safetensors beside it.",
    "zoo": "The built-in demo pool.",
    "search": "Run, or resume, a study.",
    "front": "Print the Pareto front of a study.",
    "export": "Export one trial's merge as a HF model directory.",
    "dashboard": "Serve optuna-dashboard on the study's storage.",
    "report": "Write an HTML report with plots of a study.",
    "submit": "Submit a study as a Ray job.",
    "demo": "Demo pool → search → front → export → report.",
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser, with the flags of the command `argv` names (the others by name only)."""
    parser = _Parser(prog="recycler", description=recycler.__doc__)
    parser.add_argument("--version", action="version", version=f"recycler {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_ in COMMANDS.items():
        command = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            module = importlib.import_module(f"recycler.commands.{name}")
            module.add_arguments(command)
            command.set_defaults(handler=module.run)
    return parser


class _Terminated(SystemExit):
    """SIGTERM, as an exception: it unwinds through every `finally`, so a terminated run
    removes its temporary output like any other failure."""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        arguments = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(arguments).parse_args(arguments)
        args.handler(args)
    except RecyclerError as exc:
        print(f"recycler: error: {exc}", file=sys.stderr)
        if isinstance(exc, UnreachableError):
            _leave_now(2)
        return 2
    except KeyboardInterrupt:
        print("recycler: interrupted", file=sys.stderr)
        _leave_now(130)  # as after SIGTERM: every `finally` has run
    except _Terminated as exc:
        # Every `finally` has run. Leave at once: a worker thread that the signal caught
        # while its pool was starting it is known to no pool, and the interpreter's exit
        # would wait for it forever.
        _leave_now(int(exc.code or 1))
    return 0


def _leave_now(code: int) -> NoReturn:
    """Exit without the interpreter's shutdown, which would wait for blocked threads."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
