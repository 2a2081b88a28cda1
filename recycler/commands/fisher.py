"""`recycler fisher CHECKPOINT_DIR --data FILE`: a checkpoint's diagonal Fisher, written as
fisher.safetensors beside it (the `fisher` merge method reads it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from recycler.commands._args import device, non_negative_int, positive_int
from recycler.merge.fisher import estimate_fisher_file

DATA_HELP = (
    "a .txt file (a text per line) or a .jsonl file (a 'text' field, or 'prompt' and "
    "'completion': then only the completion's tokens are scored)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", type=Path)
    parser.add_argument("--data", required=True, type=Path, help=DATA_HELP)
    parser.add_argument("--n-examples", type=positive_int, default=256)
    parser.add_argument("--max-length", type=positive_int, default=256)
    parser.add_argument("--device", default="cpu", type=device)
    parser.add_argument(
        "--sampled",
        action="store_true",
        help="the exact Fisher (labels sampled from the model) instead of the empirical one",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)


def run(args: argparse.Namespace) -> None:
    stored = estimate_fisher_file(
        args.checkpoint, args.data, n_examples=args.n_examples, max_length=args.max_length,
        device=args.device, empirical=not args.sampled, seed=args.seed,
    )  # fmt: skip
    print(f"wrote {stored.path} ({stored.n_examples} examples, norm {stored.norm:.4g})")
