"""The README's method and sampler tables and docs/internals.md's parameter table, written
from the methods' and samplers' descriptions (`methods.METHODS`, `samplers.SAMPLERS`), so
the docs cannot drift from the code.

    python -m recycler.merge.method_docs          # rewrite both blocks in place
    python -m recycler.merge.method_docs --check  # exit 1 where a block is stale

Each block sits between `<!-- methods:NAME -->` and `<!-- /methods:NAME -->`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from recycler.merge.description import MethodDescription, ParamSpec, describe_contract
from recycler.merge.methods import METHODS
from recycler.samplers import sampler_table

ROOT = Path(__file__).resolve().parents[2]
DOCS = {
    "table": ROOT / "README.md",
    "params": ROOT / "docs" / "internals.md",
    "samplers": ROOT / "README.md",
}


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


BLOCKS = {"table": method_table, "params": params_table, "samplers": sampler_table}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- methods:{name} -->\n)(?:.*?\n)?(<!-- /methods:{name} -->)", re.S)


def rewritten(name: str, text: str) -> str:
    pattern = _block(name)
    if not pattern.search(text):
        raise ValueError(f"no <!-- methods:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + BLOCKS[name]() + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks")
    args = parser.parse_args(argv)
    stale = []
    for name, path in DOCS.items():
        text = path.read_text()
        new = rewritten(name, text)
        if new != text:
            stale.append(str(path))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(
            f"stale method docs: {', '.join(stale)} (run python -m recycler.merge.method_docs)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
