"""A character-level tokenizer for the demo pool, saved as a Hugging Face fast tokenizer.

One token per character keeps the model tiny and makes lm-eval's
context/continuation split exact (no merges across the '=' boundary). No
post-processor adds BOS/EOS, so what lm-eval scores is exactly the character
sequence the model was trained on.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from recycler.zoo.skills import ALPHABET

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID = 0


def vocab() -> dict[str, int]:
    """Token -> id: the special tokens first (pad is 0), then one id per character."""
    tokens = [*SPECIAL, *ALPHABET]
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    # Every character is its own pre-token; Fuse joins them back without spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=64,
    )


def save_tokenizer(out_dir: Path) -> None:
    build_tokenizer().save_pretrained(str(out_dir))


def encode(text: str, table: dict[str, int]) -> list[int]:
    """The ids the saved tokenizer gives `text` (a dict look-up, for the training loop's speed)."""
    return [table[c] for c in text]
