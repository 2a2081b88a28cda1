"""`recycler report STUDY.yaml OUT_DIR`: an HTML page with plots of a study."""

from __future__ import annotations

import argparse
from pathlib import Path

from recycler.config import load_study_spec
from recycler.report import write_report
from recycler.search.study import load_view


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", type=Path)
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)


def run(args: argparse.Namespace) -> None:
    spec = load_study_spec(args.study)
    index = write_report(spec, load_view(spec), args.out_dir)
    print(f"report written to {index}")
