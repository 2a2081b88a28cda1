"""Tiny real pools for the merge-engine tests: HF dirs written by transformers and peft."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 48


def tiny_config(*, tie: bool = False, vocab: int = VOCAB) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def save_tokenizer(directory: Path) -> None:
    chars = [chr(c) for c in range(ord("a"), ord("a") + VOCAB - 4)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(directory)


def make_base(directory: Path, *, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tie=tie))
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return model


def make_finetune(
    base: LlamaForCausalLM,
    directory: Path,
    *,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
    scale: float = 0.02,
    max_shard_size: str | None = None,
    tie: bool | None = None,
) -> None:
    """A checkpoint = base + small random delta, saved in `dtype` (optionally sharded)."""
    tie = base.config.tie_word_embeddings if tie is None else tie
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tie=tie))
    state = {k: v for k, v in base.state_dict().items() if k in model.state_dict()}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale * p.abs().mean().clamp_min(1e-3))
    model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)


def make_pool(root: Path) -> dict[str, Path]:
    """base (fp32) + three checkpoints: bf16 single file, fp32 sharded, fp16 single file."""
    base = make_base(root / "base")
    make_finetune(base, root / "c0", seed=1, dtype=torch.bfloat16)
    make_finetune(base, root / "c1", seed=2, dtype=torch.float32, max_shard_size="30KB")
    make_finetune(base, root / "c2", seed=3, dtype=torch.float16)
    return {"base": root / "base", "c0": root / "c0", "c1": root / "c1", "c2": root / "c2"}


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state
