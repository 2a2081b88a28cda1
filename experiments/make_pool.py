"""Random Llama checkpoint pools for tests and benchmarks (made here, nothing downloaded).

A pool is a base model plus checkpoints that differ from it by small random
deltas, each one a real Hugging Face model directory written by
`LlamaForCausalLM.save_pretrained` (config.json, generation_config.json,
model.safetensors or shards + index). Weights are drawn from a seeded
`torch.Generator`, so a pool is the same bytes every time it is built.

    python experiments/make_pool.py OUT_DIR --size 60M --checkpoints 4 [--base]

Pools are cached: a complete pool has a `pool.json` stamp with the parameters it
was built from, and `build_pool` returns at once when the stamp matches.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

STAMP = "pool.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LlamaShape:
    """The size of a Llama-style decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_word_embeddings: bool = False

    def n_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        layer = attn + mlp + 2 * self.hidden
        embed = self.vocab * self.hidden
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.layers * layer + self.hidden


SHAPES: dict[str, LlamaShape] = {
    # the parity test's pool: hidden 32, 2 layers, vocab 64
    "tiny": LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64),
    # ~58.6M parameters (117 MB per bf16 checkpoint)
    "60M": LlamaShape(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8, vocab=32000),
    # ~438M parameters (877 MB per bf16 checkpoint)
    "440M": LlamaShape(
        hidden=1024, intermediate=2816, layers=29, heads=16, kv_heads=16, vocab=32000
    ),
}


@dataclass(frozen=True)
class PoolSpec:
    """Everything that decides a pool's bytes."""

    shape: LlamaShape
    n_checkpoints: int = 4
    with_base: bool = True
    # dtype name of each checkpoint (len == n_checkpoints); None: all `base_dtype`
    checkpoint_dtypes: tuple[str, ...] | None = None
    base_dtype: str = "bfloat16"
    # std of each checkpoint's delta, relative to the base weights' init std (0.02)
    delta_scale: float = 0.1
    seed: int = 0
    max_shard_size: str = "5GB"
    format_version: int = field(default=FORMAT_VERSION)

    def dtypes(self) -> tuple[str, ...]:
        if self.checkpoint_dtypes is None:
            return (self.base_dtype,) * self.n_checkpoints
        if len(self.checkpoint_dtypes) != self.n_checkpoints:
            raise ValueError("checkpoint_dtypes must have one entry per checkpoint")
        return self.checkpoint_dtypes


@dataclass(frozen=True)
class Pool:
    root: Path
    base: Path | None
    checkpoints: tuple[Path, ...]
    spec: PoolSpec

    def files(self, include_base: bool = False) -> list[Path]:
        """Every safetensors file of the checkpoints (and the base when asked)."""
        dirs = [*self.checkpoints, *([self.base] if include_base and self.base else [])]
        return [f for d in dirs for f in sorted(d.glob("*.safetensors"))]


def llama_config(shape: LlamaShape, dtype: str = "bfloat16") -> object:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype=dtype,
    )


def _meta_model(shape: LlamaShape, dtype: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape, dtype))  # type: ignore[arg-type]
    return model


def _base_tensor(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) * 0.02


def _save(
    model_shape: LlamaShape,
    tensors: dict[str, torch.Tensor],
    out: Path,
    dtype: str,
    max_shard_size: str,
) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = _meta_model(model_shape, dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)  # type: ignore[operator]


def build_pool(root: Path, spec: PoolSpec, *, force: bool = False) -> Pool:
    """Build (or reuse) the pool `spec` under `root`: root/base, root/ckpt_0 ... ckpt_{n-1}."""
    root = Path(root)
    names = [f"ckpt_{i}" for i in range(spec.n_checkpoints)]
    pool = Pool(
        root=root,
        base=root / "base" if spec.with_base else None,
        checkpoints=tuple(root / n for n in names),
        spec=spec,
    )
    stamp = root / STAMP
    wanted = asdict(spec)
    if not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == json.loads(json.dumps(wanted)):
                return pool
        except json.JSONDecodeError:
            pass
    if root.exists():
        shutil.rmtree(root)
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    template = _meta_model(spec.shape, spec.base_dtype).state_dict()
    gen = torch.Generator().manual_seed(spec.seed)
    base_dt = getattr(torch, spec.base_dtype)
    base = {k: _base_tensor(k, v.shape, gen).to(base_dt) for k, v in template.items()}
    if spec.with_base:
        _save(spec.shape, base, tmp / "base", spec.base_dtype, spec.max_shard_size)
    for i, (name, dtype_name) in enumerate(zip(names, spec.dtypes())):
        gen = torch.Generator().manual_seed(spec.seed * 1000 + i + 1)
        dt = getattr(torch, dtype_name)
        tensors = {
            k: (b.float() + torch.randn(b.shape, generator=gen) * (0.02 * spec.delta_scale)).to(dt)
            for k, b in base.items()
        }
        _save(spec.shape, tensors, tmp / name, dtype_name, spec.max_shard_size)
        del tensors
    (tmp / STAMP).write_text(json.dumps(wanted, indent=1))
    tmp.rename(root)
    return pool


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--base", action="store_true", help="write a base model too")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--delta-scale", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    spec = PoolSpec(
        shape=SHAPES[args.size],
        n_checkpoints=args.checkpoints,
        with_base=args.base,
        base_dtype=args.dtype,
        delta_scale=args.delta_scale,
        seed=args.seed,
    )
    pool = build_pool(Path(args.out_dir), spec, force=args.force)
    print(
        f"{spec.shape.n_params():,} parameters; {len(pool.checkpoints)} checkpoints"
        f"{' + base' if pool.base else ''} in {pool.root}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
