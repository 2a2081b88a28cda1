"""Measure whether a built demo pool is a good pool for recycling (a development step).

`recycler.zoo.quality`'s checklist, run from the repository root:

    python -m tools.zoo_quality DIR [--merges 30] [--seed 0]

prints the markdown table of recycler/zoo/README.md and writes DIR/quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from recycler.zoo.quality import measure, render_markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.zoo_quality", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dir", type=Path)
    parser.add_argument("--merges", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = measure(args.dir, args.merges, args.seed)
    (args.dir / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(render_markdown(args.dir, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
