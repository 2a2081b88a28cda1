"""Diagonal Fisher information of a checkpoint, for Fisher merging (Matena & Raffel 2021).

F_j = mean over examples of (∂ log p(y | x) / ∂θ_j)², with y the observed next
tokens (the empirical Fisher, default) or tokens sampled from the model (the exact
Fisher). One example at a time, so the square is of a per-example gradient. An
example is a text (every token after the first is a target) or a prompt and its
completion (only the completion's tokens are: the Fisher of the task's answers,
not of its questions). The
result is stored as `fisher.safetensors` beside the checkpoint, with its global L2
norm in the metadata; the merge scales each Fisher to unit norm and floors it at
1e-6, as the paper's code does.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from recycler.errors import RecyclerError
from recycler.pool import Checkpoint, Pool
from recycler.pool.safetensors_file import SafetensorsFile

FISHER_FLOOR = 1e-6


@dataclass(frozen=True)
class StoredFisher:
    """A diagonal Fisher written beside its checkpoint."""

    path: Path
    n_examples: int
    norm: float


class FisherFile:
    """A stored diagonal Fisher, read tensor by tensor, unit-normalised and floored."""

    def __init__(self, ckpt: Checkpoint) -> None:
        path = ckpt.fisher_path
        if not path.is_file():
            raise RecyclerError(
                f"{ckpt.path}: no {path.name} for fisher merging; run `recycler fisher` on it first"
            )
        self.file = SafetensorsFile(path)
        try:
            self.norm = float(self.file.metadata["norm"])
        except (KeyError, ValueError):
            raise RecyclerError(
                f"{path}: metadata has no Fisher norm; recompute it with `recycler fisher`"
            ) from None
        self.aliases = dict(ckpt.aliases)

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        key = name if name in self.file.tensors else self.aliases.get(name, name)
        if key not in self.file.tensors:
            raise RecyclerError(f"{self.file.path}: tensor {name}: missing")
        return (self.file.read(key).to(device).float() / self.norm).clamp_min_(FISHER_FLOOR)


def open_fishers(pool: Pool) -> list[FisherFile]:
    return [FisherFile(c) for c in pool.checkpoints]


@dataclass(frozen=True)
class Example:
    """A text to score: its tokens after `prompt` are the targets."""

    prompt: str
    completion: str


def read_examples(path: Path, limit: int) -> list[Example]:
    """Examples from a .txt file (a text per line) or a .jsonl file (objects with a
    "text" field, or "prompt" and "completion" fields)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise RecyclerError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix == ".jsonl":
        examples = [_example(line, f"{path}: line {i}") for i, line in enumerate(lines, 1)]
    else:
        examples = [Example("", line) for line in lines]
    if not examples:
        raise RecyclerError(f"{path}: no examples")
    return examples[:limit]


def _example(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if isinstance(record, dict):
        if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            return Example(record["prompt"], record["completion"])
        if "text" in record and "prompt" not in record:
            return Example("", str(record["text"]))
    raise RecyclerError(
        f"{where}: expected a JSON object with a 'text' field, or 'prompt' and 'completion' strings"
    )


def estimate_fisher(
    model_dir: Path,
    examples: list[Example],
    *,
    max_length: int = 256,
    device: str = "cpu",
    empirical: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of the model in `model_dir` over `examples` (fp32, by parameter name)."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(torch.device(device))  # type: ignore[arg-type]  # transformers wraps Module.to and hides its signature
    model.eval()  # no dropout: the Fisher of the model as it is
    # Every name, tied ones included, so the file can be read under any of them.
    params = dict(model.named_parameters(remove_duplicate=False))
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    counted = 0
    for example in examples:
        ids = tokenizer(
            example.prompt + example.completion,
            return_tensors="pt",
            truncation=True,
            max_length=max_length,
        )["input_ids"].to(device)
        # Targets are tokens 1.. of the sequence; those inside the prompt are not scored.
        # (The prompt's own tokenisation gives its length, special tokens included.)
        prompt_len = len(tokenizer(example.prompt)["input_ids"]) if example.prompt else 1
        scored = torch.arange(1, ids.shape[1], device=ids.device) >= prompt_len
        if not bool(scored.any()):
            continue
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[:, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        if empirical:
            targets = ids[:, 1:]
        else:
            targets = torch.distributions.Categorical(logits=logits.detach()).sample()
        log_likelihood = (log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * scored).sum()
        log_likelihood.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name].add_(p.grad.float().square())
        counted += 1
    if counted == 0:
        raise RecyclerError(
            "fisher: no example has a token to score (a text of two or more tokens, or a non-empty "
            "completion)"
        )
    return {name: f / counted for name, f in fisher.items()}


def estimate_fisher_file(
    checkpoint: Path,
    data: Path,
    *,
    n_examples: int = 256,
    max_length: int = 256,
    device: str = "cpu",
    empirical: bool = True,
    seed: int = 0,
) -> StoredFisher:
    """`recycler fisher`: estimate and store `fisher.safetensors` beside the checkpoint."""
    if not (checkpoint / "config.json").is_file():
        raise RecyclerError(
            f"{checkpoint}: not a Hugging Face model dir (no config.json); LoRA adapters must be "
            "merged first"
        )
    examples = read_examples(data, n_examples)
    fisher = estimate_fisher(
        checkpoint, examples, max_length=max_length, device=device, empirical=empirical, seed=seed
    )
    stored = Pool.open([checkpoint]).reference.stored_names()
    fisher = {name: fisher[name] for name in stored if name in fisher}
    # The norm over the tensors the checkpoint stores: a tied head counts once.
    norm = math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))
    out = checkpoint / "fisher.safetensors"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    metadata = {
        "norm": repr(norm),
        "n_examples": str(len(examples)),
        "kind": "empirical" if empirical else "sampled",
        "data": str(data),
    }
    try:
        save_file({k: v.contiguous().cpu() for k, v in fisher.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return StoredFisher(out, len(examples), norm)
