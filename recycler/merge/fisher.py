"""Diagonal Fisher information of a checkpoint, for Fisher merging (Matena & Raffel 2021).

F_j = mean over examples of (∂ log p(y | x) / ∂θ_j)², with y the observed next
tokens (the empirical Fisher, default) or tokens sampled from the model (the exact
Fisher). One example at a time, so the square is of a per-example gradient. The
result is stored as `fisher.safetensors` beside the checkpoint, with its global L2
norm in the metadata; the merge scales each Fisher to unit norm and floors it at
1e-6, as the paper's code does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from recycler.errors import RecyclerError
from recycler.pool import Checkpoint, Pool
from recycler.pool.safetensors_file import SafetensorsFile

FISHER_FLOOR = 1e-6


class FisherFile:
    """A stored diagonal Fisher, read tensor by tensor, unit-normalised and floored."""

    def __init__(self, ckpt: Checkpoint) -> None:
        path = ckpt.fisher_path
        if not path.is_file():
            raise RecyclerError(f"{ckpt.path}: no {path.name} for fisher merging; run `recycler fisher {ckpt.path} --data FILE` first")
        self.file = SafetensorsFile(path)
        try:
            self.norm = float(self.file.metadata["norm"])
        except (KeyError, ValueError):
            raise RecyclerError(f"{path}: metadata has no Fisher norm; recompute it with `recycler fisher`") from None
        self.aliases = dict(ckpt.aliases)

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        key = name if name in self.file.tensors else self.aliases.get(name, name)
        if key not in self.file.tensors:
            raise RecyclerError(f"{self.file.path}: tensor {name}: missing")
        return (self.file.read(key).to(device).float() / self.norm).clamp_min_(FISHER_FLOOR)


def open_fishers(pool: Pool) -> list[FisherFile]:
    return [FisherFile(c) for c in pool.checkpoints]


def read_examples(path: Path, limit: int) -> list[str]:
    """Texts from a .txt file (one per line) or a .jsonl file (its "text" field)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise RecyclerError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                texts.append(str(record["text"]))
            except (ValueError, KeyError, TypeError):
                raise RecyclerError(f"{path}: line {i}: expected a JSON object with a 'text' field") from None
    else:
        texts = lines
    if not texts:
        raise RecyclerError(f"{path}: no examples")
    return texts[:limit]


def estimate_fisher(
    model_dir: Path,
    texts: list[str],
    *,
    max_length: int = 256,
    device: str = "cpu",
    empirical: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of the model in `model_dir` over `texts` (fp32, by parameter name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(torch.device(device))  # type: ignore[arg-type]  # transformers wraps Module.to and hides its signature
    model.eval()  # no dropout: the Fisher of the model as it is
    # Every name, tied ones included, so the file can be read under any of them.
    params = dict(model.named_parameters(remove_duplicate=False))
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    counted = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].to(device)
        if ids.shape[1] < 2:
            continue
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[:, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        if empirical:
            targets = ids[:, 1:]
        else:
            targets = torch.distributions.Categorical(logits=logits.detach()).sample()
        log_likelihood = log_probs.gather(-1, targets.unsqueeze(-1)).sum()
        log_likelihood.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name].add_(p.grad.float().square())
        counted += 1
    if counted == 0:
        raise RecyclerError("fisher: no example has two or more tokens")
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
) -> Path:
    """`recycler fisher`: estimate and store `fisher.safetensors` beside the checkpoint."""
    from safetensors.torch import save_file

    if not (checkpoint / "config.json").is_file():
        raise RecyclerError(f"{checkpoint}: not a Hugging Face model dir (no config.json); LoRA adapters must be merged first")
    texts = read_examples(data, n_examples)
    fisher = estimate_fisher(checkpoint, texts, max_length=max_length, device=device, empirical=empirical, seed=seed)
    stored = Pool.open([checkpoint]).reference.stored_names()
    fisher = {name: fisher[name] for name in stored if name in fisher}
    # The norm over the tensors the checkpoint stores: a tied head counts once.
    norm = math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))
    out = checkpoint / "fisher.safetensors"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    metadata = {"norm": repr(norm), "n_examples": str(len(texts)), "kind": "empirical" if empirical else "sampled", "data": str(data)}
    try:
        save_file({k: v.contiguous().cpu() for k, v in fisher.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} ({len(texts)} examples, norm {norm:.4g})")
    return out

