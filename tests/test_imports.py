"""The import graph of recycler/, read with ast: no module imports another that imports it
back (directly or around a circle), and no part imports a part above it in LAYERS.

Every import counts, at module top or inside a function: a lazy import is still a
dependency.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "recycler"


def design_layers() -> list[set[str]]:
    """The parts of recycler/ by layer, lowest first, as docs/design.md's table of parts
    gives them (`| 6 | `search/` | ...`): a part may import the parts of lower layers only.
    A part is a subpackage or a top-level module; `recycler` is the package's own
    __init__ (the version)."""
    layers: dict[int, set[str]] = {}
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    for number, cell in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.M):
        names = re.findall(r"`([a-z_]+)(?:\.py|/)`", cell)
        parts = {"recycler" if name == "__init__" else name for name in names}
        layers.setdefault(int(number), set()).update(parts)
    return [layers[n] for n in sorted(layers)]


LAYERS = design_layers()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> Iterator[str]:
    """The recycler modules `path` imports (a `from pkg import mod` names the module)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "recycler")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "recycler"
        ):
            yield node.module
            yield from (
                f"{node.module}.{a.name}"
                for a in node.names
                if f"{node.module}.{a.name}" in MODULES
            )


GRAPH = {
    name: {m for m in imported(path) if m in MODULES and m != name}
    for name, path in MODULES.items()
}


def part(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else bits[0]


def layer(module: str) -> int:
    return next(i for i, parts in enumerate(LAYERS) if part(module) in parts)


def test_every_part_has_a_layer() -> None:
    assert LAYERS and all(LAYERS)  # the table was read
    known = set().union(*LAYERS)
    assert {part(m) for m in MODULES} == known


def test_no_part_imports_a_part_above_it() -> None:
    upward = sorted(
        f"{a} imports {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if part(a) != part(b) and layer(b) >= layer(a)
    )
    assert upward == []


def test_no_import_circle() -> None:
    # Tarjan's strongly connected components: a component of two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert circles == []
