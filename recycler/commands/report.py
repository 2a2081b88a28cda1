"""`recycler report STUDY.yaml OUT_DIR [--force]`: an HTML page with plots of a study (a
non-empty OUT_DIR is replaced only with --force, as `merge` and `export` do)."""

from __future__ import annotations

import argparse
from pathlib import Path

from recycler.commands._args import force_hint
from recycler.config import load_study_spec
from recycler.report import write_report
from recycler.search.study import load_view


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", type=Path)
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> None:
    spec = load_study_spec(args.study)
    with force_hint():
        index = write_report(spec, load_view(spec), args.out_dir, force=args.force)
    print(f"report written to {index}")
