"""The README's method table and docs/internals.md's parameter table are the descriptions' own."""

from __future__ import annotations

import pytest

from recycler.merge import method_docs
from recycler.merge.methods import METHODS
from recycler.samplers import SAMPLERS, sampler_table


@pytest.mark.parametrize("block", sorted(method_docs.DOCS))
def test_docs_match_the_descriptions(block: str) -> None:
    path = method_docs.DOCS[block]
    text = path.read_text()
    assert method_docs.rewritten(block, text) == text, (
        f"{path} is stale: run python -m recycler.merge.method_docs"
    )


def test_every_method_and_parameter_is_documented() -> None:
    table, params = method_docs.method_table(), method_docs.params_table()
    for m in METHODS.values():
        assert f"[`{m.name}`]" in table
        for p in m.params:
            assert f"| `{m.name}` | `{p.name}` |" in params


def test_every_sampler_is_documented() -> None:
    table = sampler_table()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == [
        f"`{name}`" for name in SAMPLERS
    ]
