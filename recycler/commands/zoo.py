"""`recycler zoo build DIR [--size micro|small] [--seed N] [--architecture llama|qwen2]`:
train the demo pool and write its lm-eval tasks and a ready study file."""

from __future__ import annotations

import argparse
from pathlib import Path

from recycler.commands._args import non_negative_int
from recycler.zoo.build import ARCHITECTURES, DEFAULT_ARCHITECTURE, build_zoo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="zoo_command", required=True, parser_class=type(parser))
    build = sub.add_parser("build", help="Train the demo pool and write its lm-eval tasks.")
    build.add_argument("dir", metavar="DIR", type=Path)
    build.add_argument("--size", choices=["micro", "small"], default="small")
    build.add_argument("--seed", type=non_negative_int, default=0)
    build.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default=DEFAULT_ARCHITECTURE,
        help=f"the models' transformers architecture (default: {DEFAULT_ARCHITECTURE})",
    )


def run(args: argparse.Namespace) -> None:
    build_zoo(args.dir, size=args.size, seed=args.seed, architecture=args.architecture)
