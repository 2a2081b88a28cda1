"""The docs' generated blocks (README's method table, docs/internals.md's parameter table)
are the code's own: `tools/generated_docs.py` would not change them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recycler.merge.methods import METHODS
from tools import generated_docs


@pytest.mark.parametrize("block", generated_docs.BLOCKS, ids=lambda b: b.name)
def test_docs_match_the_code(block: generated_docs.Block) -> None:
    text = block.path.read_text(encoding="utf-8")
    assert block.rewritten(text) == text, (
        f"{block.path} is stale: run python -m tools.generated_docs"
    )


def test_every_method_and_parameter_is_documented() -> None:
    table, params = generated_docs.method_table(), generated_docs.params_table()
    for m in METHODS.values():
        assert f"[`{m.name}`]" in table
        for p in m.params:
            assert f"| `{m.name}` | `{p.name}` |" in params


def test_check_names_a_stale_file_and_rewriting_mends_it(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- methods:table -->\nold rows\n<!-- /methods:table -->\nafter\n")
    block = generated_docs.Block("methods:table", doc, generated_docs.method_table)
    rewritten = block.rewritten(doc.read_text())
    assert "old rows" not in rewritten
    assert rewritten.startswith("before\n") and rewritten.endswith("after\n")
    assert generated_docs.method_table() in rewritten
    with pytest.raises(ValueError, match="no <!-- methods:params --> block"):
        generated_docs.Block("methods:params", doc, generated_docs.params_table).rewritten(
            doc.read_text()
        )


def test_the_command_checks_the_repository() -> None:
    root = Path(generated_docs.__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "tools.generated_docs", "--check"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
