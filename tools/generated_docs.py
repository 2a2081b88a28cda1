"""The generated blocks of the repository's docs, written from the code that owns their
facts, so the docs cannot drift from it. A development step, run from the repository root:

    python -m tools.generated_docs          # rewrite every block in place
    python -m tools.generated_docs --check  # exit 1 naming each file with a stale block

A block sits between `<!-- NAME -->` and `<!-- /NAME -->` in its file. To add one, write
a function that returns its text and list it in `BLOCKS`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recycler.merge.description import MethodDescription, ParamSpec, describe_contract
from recycler.merge.methods import METHODS
from recycler.samplers import sampler_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INTERNALS = ROOT / "docs" / "internals.md"


def _default(p: ParamSpec) -> str:
    if p.default is None:
        return "required"
    if isinstance(p.default, bool):
        return "true" if p.default else "false"
    return f"{p.default:g}"


def _traits(m: MethodDescription) -> str:
    out = []
    if m.linear:
        out.append("linear (C kernel, file to file)")
    if m.gram_terms is not None:
        out.append("C kernel, file to file (inner products read first)")
    if m.row_splittable:
        out.append("row-splittable")
    if m.random:
        out.append(f"random: seeded by {m.seeding}")
    if m.needs_fishers:
        out.append("reads fisher.safetensors")
    return "; ".join(out) or "–"


def _cell(text: str) -> str:
    """A table cell: the formulas' absolute values would end the cell."""
    return text.replace("|", "\\|")


def method_table() -> str:
    """README: one row per merge method (formula, parameters, inputs, serving, differences)."""
    lines = [
        "| method | formula | parameters (default) | inputs | serving "
        "| differs from mergekit 0.1.5 |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        params = ", ".join(f"`{p.name}` ({_default(p)})" for p in m.params) or "–"
        lines.append(
            f"| [`{m.name}`]({m.source}) | {_cell(m.formula)} | {params} "
            f"| {describe_contract(m)} | {_traits(m)} | {_cell(m.differs) or '–'} |"
        )
    return "\n".join(lines)


def params_table() -> str:
    """docs/internals.md: one row per method and parameter."""
    lines = [
        "| method | parameter | type | scope | default | allowed | `tune` range |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        for p in m.params:
            tune = f"[{p.tune[0]:g}, {p.tune[1]:g}]" if p.tune is not None else "–"
            allowed = "true / false" if p.kind == "bool" else str(p.bounds)
            lines.append(
                f"| `{m.name}` | `{p.name}` | {p.kind} | {p.scope} | {_default(p)} "
                f"| {allowed} | {tune} |"
            )
    return "\n".join(lines)


@dataclass(frozen=True)
class Block:
    name: str  # the marker: <!-- name --> ... <!-- /name -->
    path: Path
    text: Callable[[], str]

    def rewritten(self, doc: str) -> str:
        """`doc` with this block's text replaced by the current one (ValueError: no block)."""
        name = re.escape(self.name)
        pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
        if not pattern.search(doc):
            raise ValueError(f"{self.path}: no <!-- {self.name} --> block")
        return pattern.sub(lambda m: m.group(1) + self.text() + "\n" + m.group(2), doc)


BLOCKS = (
    Block("methods:table", README, method_table),
    Block("methods:params", INTERNALS, params_table),
    Block("samplers:table", README, sampler_table),
)


def stale_files(write: bool) -> list[Path]:
    """The files with a stale block (each rewritten in place where `write`)."""
    stale = []
    for path in dict.fromkeys(b.path for b in BLOCKS):
        text = path.read_text(encoding="utf-8")
        new = text
        for block in (b for b in BLOCKS if b.path == path):
            new = block.rewritten(new)
        if new != text:
            stale.append(path)
            if write:
                path.write_text(new, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks")
    args = parser.parse_args(argv)
    stale = stale_files(write=not args.check)
    if args.check and stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        print(
            f"stale generated docs: {names} (run python -m tools.generated_docs)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
