"""The `recycler` command: parse, call the library, print. Nothing imports this module.

Exit codes: 0 success; 2 bad input or configuration (one line `recycler: error: ...`
on stderr, no traceback); 1 an internal fault. Heavy libraries are imported inside
each command so that `recycler --help` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from recycler import __version__
from recycler.errors import RecyclerError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same single line as every other input error."""

    def error(self, message: str) -> NoReturn:
        raise RecyclerError(f"{self.prog.removeprefix('recycler').strip() or 'usage'}: {message}")


def _cmd_merge(args: argparse.Namespace) -> None:
    from recycler.merge.run import merge_recipe_file

    merge_recipe_file(
        Path(args.recipe),
        Path(args.out_dir),
        device=args.device,
        force=args.force,
        allow_pickle=args.allow_pickle,
        max_shard_bytes=_parse_size(args.max_shard_size),
    )


def _cmd_fisher(args: argparse.Namespace) -> None:
    from recycler.merge.fisher import estimate_fisher_file

    estimate_fisher_file(
        Path(args.checkpoint),
        Path(args.data),
        n_examples=args.n_examples,
        max_length=args.max_length,
        device=args.device,
        empirical=not args.sampled,
        seed=args.seed,
    )


def _cmd_zoo_build(args: argparse.Namespace) -> None:
    from recycler.zoo.build import build_zoo

    build_zoo(Path(args.dir), size=args.size, seed=args.seed)


def _cmd_search(args: argparse.Namespace) -> None:
    from recycler.search.run import run_search

    run_search(Path(args.study), n_trials=args.n_trials)


def _cmd_front(args: argparse.Namespace) -> None:
    from recycler.search.show import print_front

    print_front(Path(args.study), fmt=args.format, split=args.split)


def _cmd_export(args: argparse.Namespace) -> None:
    from recycler.search.pick import export_trial

    export_trial(
        Path(args.study), Path(args.out_dir), trial=args.trial, pick=args.pick, force=args.force
    )


def _cmd_dashboard(args: argparse.Namespace) -> None:
    from recycler.search.dashboard import serve_dashboard

    serve_dashboard(Path(args.study), host=args.host, port=args.port)


def _cmd_report(args: argparse.Namespace) -> None:
    from recycler.report import write_report

    write_report(Path(args.study), Path(args.out_dir))


def _cmd_submit(args: argparse.Namespace) -> None:
    from recycler.cluster.jobs import submit_study

    submit_study(Path(args.study), address=args.address, follow=args.follow, n_trials=args.n_trials)


def _cmd_demo(args: argparse.Namespace) -> None:
    from recycler.demo import run_demo

    run_demo(Path(args.workdir), n_trials=args.n_trials, size=args.size)


def _parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count → bytes."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    try:
        value = int(float(number) * units[stripped[len(number) :]])
    except (KeyError, ValueError):
        raise RecyclerError(
            f"--max-shard-size: cannot read {text!r} as a size (e.g. 5GB)"
        ) from None
    if value <= 0:
        raise RecyclerError(f"--max-shard-size: must be positive, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="recycler", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"recycler {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(
        name: str, handler: Callable[[argparse.Namespace], None], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = command(
        "merge",
        _cmd_merge,
        "Merge checkpoints with a mergekit-style recipe into a HF model directory.",
    )
    p.add_argument("recipe", metavar="RECIPE.yaml")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled .bin checkpoints (loaded with weights_only=True)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")

    p = command(
        "fisher",
        _cmd_fisher,
        "Estimate a checkpoint's diagonal Fisher from a text/jsonl file; writes fisher.safetensors beside it.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    p.add_argument(
        "--data",
        required=True,
        help="a .txt file (a text per line) or a .jsonl file (a 'text' field, or 'prompt' and 'completion': then only the completion's tokens are scored)",
    )
    p.add_argument("--n-examples", type=int, default=256)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--sampled",
        action="store_true",
        help="the exact Fisher (labels sampled from the model) instead of the empirical one",
    )
    p.add_argument("--seed", type=int, default=0)

    zoo = command("zoo", lambda a: None, "The built-in demo pool.")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser)
    p = zoo_sub.add_parser("build", help="Train the demo pool and write its lm-eval tasks.")
    p.set_defaults(handler=_cmd_zoo_build)
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--size", choices=["micro", "small"], default="small")
    p.add_argument("--seed", type=int, default=0)

    p = command("search", _cmd_search, "Run, or resume, a study.")
    p.add_argument("study", metavar="STUDY.yaml")
    p.add_argument(
        "--n-trials",
        type=int,
        default=None,
        help="total trials for the study (default: the study file's)",
    )

    p = command("front", _cmd_front, "Print the Pareto front of a study.")
    p.add_argument("study", metavar="STUDY.yaml")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--split", choices=["dev", "test"], default="dev")

    p = command("export", _cmd_export, "Export one trial's merge as a HF model directory.")
    p.add_argument("study", metavar="STUDY.yaml")
    p.add_argument("out_dir", metavar="OUT_DIR")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--trial", type=int, default=None, help="trial number")
    group.add_argument("--pick", default=None, help="knee | best:OBJECTIVE (default: knee)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    p = command("dashboard", _cmd_dashboard, "Serve optuna-dashboard on the study's storage.")
    p.add_argument("study", metavar="STUDY.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)

    p = command("report", _cmd_report, "Write an HTML report with plots of a study.")
    p.add_argument("study", metavar="STUDY.yaml")
    p.add_argument("out_dir", metavar="OUT_DIR")

    p = command("submit", _cmd_submit, "Submit a study as a Ray job.")
    p.add_argument("study", metavar="STUDY.yaml")
    p.add_argument(
        "--address", required=True, help="the Ray dashboard address, e.g. http://HEAD:8265"
    )
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--n-trials", type=int, default=None)

    p = command("demo", _cmd_demo, "Demo pool → search → front → export → report.")
    p.add_argument("--workdir", default="demo")
    p.add_argument("--n-trials", type=int, default=None)
    p.add_argument("--size", choices=["micro", "small"], default="small")
    return parser


class _Terminated(SystemExit):
    """SIGTERM, as an exception: it unwinds through every `finally`, so a terminated run
    removes its temporary output like any other failure."""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        args = build_parser().parse_args(argv)
        args.handler(args)
    except RecyclerError as exc:
        print(f"recycler: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recycler: interrupted", file=sys.stderr)
        return 130
    except _Terminated as exc:
        # Every `finally` has run. Leave at once: a worker thread that the signal caught
        # while its pool was starting it is known to no pool, and the interpreter's exit
        # would wait for it forever.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(exc.code or 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
