"""Which tokenizer and chat template a merge writes: a recipe's `tokenizer_source`,
`tokenizer:` and `chat_template` keys, as mergekit 0.1.5 names them.

Built: the base's tokenizer (`base`, the default: the base model's, else the first
model's) or a model's (its path, or an earlier stage's name), and a chat template given
as its Jinja text. Not built, each refused with one line: a `union` vocabulary (it
needs the embedding rows rebuilt), added `tokens`, `pad_to_multiple_of`, and
mergekit's named templates (`chatml`, `auto`, ...): give the template's text instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recycler.errors import RecyclerError

KEYS = ("tokenizer_source", "tokenizer", "chat_template")


@dataclass(frozen=True)
class TokenizerChoice:
    source: str | None = None  # None or "base": the base's; else a model dir
    chat_template: str | None = None  # Jinja text written with the tokenizer


def read_tokenizer_keys(data: dict[str, Any], where: str) -> TokenizerChoice:
    source = data.get("tokenizer_source")
    block = data.get("tokenizer")
    if block is not None:
        if source is not None:
            raise RecyclerError(f"{where}: tokenizer: give tokenizer or tokenizer_source, not both")
        if not isinstance(block, dict):
            raise RecyclerError(f"{where}: tokenizer: must be a mapping with source")
        for key in block:
            if key != "source":
                raise RecyclerError(
                    f"{where}: tokenizer.{key}: not built (recycler copies a tokenizer as it "
                    "is: source only)"
                )
        source = block.get("source")
        name = "tokenizer.source"
    else:
        name = "tokenizer_source"
    if source is not None and not isinstance(source, str):
        raise RecyclerError(f"{where}: {name}: must be base or a model path, got {source!r}")
    if source == "union":
        raise RecyclerError(
            f"{where}: {name}: union is not built (it rebuilds the embedding rows for a "
            "merged vocabulary); use base or a model, or mergekit-yaml for a union"
        )
    template = data.get("chat_template")
    if template is not None and (
        not isinstance(template, str) or ("{{" not in template and "{%" not in template)
    ):
        raise RecyclerError(
            f"{where}: chat_template: {template!r}: named templates are not built; give the "
            "template's Jinja text"
        )
    return TokenizerChoice(source, template)
