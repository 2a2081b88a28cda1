"""A small, deterministic causal-LM training loop for the demo pool (full and LoRA).

Not HF Trainer: its start-up alone would eat the micro build's time budget.
What it writes is what Trainer writes (`trainer_state.json` with `global_step`
and a `log_history` of mean losses), because that is what metric-weighted
averaging reads from real pools.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recycler.zoo.skills import TrainStream
from recycler.zoo.tokenizer import PAD_ID, encode

IGNORE = -100


def make_batch(
    pairs: Sequence[tuple[str, str]], table: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels for prompt+answer pairs; only answer characters carry loss.

    Right padding with no attention mask is exact for a causal model: real
    tokens never attend to the pads that follow them, and pads carry no loss.
    """
    seqs = [encode(p + a, table) for p, a in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for row, ((prompt, _), seq) in enumerate(zip(pairs, seqs)):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt) : len(seq)] = ids[row, len(prompt) : len(seq)]
    return ids, labels


@dataclass
class TrainLog:
    """Trainer-style bookkeeping: the losses logged so far, averaged over `every` steps."""

    every: int
    history: list[dict[str, float | int]] = field(default_factory=list)
    _acc: float = 0.0
    _n: int = 0

    def add(self, step: int, loss: float, lr: float, total: int) -> None:
        self._acc += loss
        self._n += 1
        if step % self.every == 0 or step == total:
            self.history.append(
                {
                    "epoch": round(step / total, 4),
                    "learning_rate": lr,
                    "loss": round(self._acc / self._n, 6),
                    "step": step,
                }
            )
            self._acc, self._n = 0.0, 0

    def last_loss(self) -> float | None:
        return float(self.history[-1]["loss"]) if self.history else None


def trainer_state(log: TrainLog, step: int, max_steps: int, batch_size: int) -> dict[str, Any]:
    """The fields HF Trainer writes to trainer_state.json, for the logs up to `step`."""
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": round(step / max_steps, 4),
        "eval_steps": None,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": [h for h in log.history if int(h["step"]) <= step],
        "logging_steps": log.every,
        "max_steps": max_steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": 1,
        "save_steps": None,
        "total_flos": 0.0,
        "train_batch_size": batch_size,
        "trial_name": None,
        "trial_params": None,
    }


def write_trainer_state(out_dir: Path, state: dict[str, Any]) -> None:
    (out_dir / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    # Linear warm-up then cosine decay to a tenth of the peak: a common recipe,
    # and it makes late checkpoints of a run close to each other (as in real runs).
    if step <= warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    batch_size: int
    warmup: int = 0
    weight_decay: float = 0.0
    log_every: int = 10


def train(
    model: nn.Module,
    stream: TrainStream,
    table: dict[str, int],
    schedule: Schedule,
    *,
    on_step: Callable[[int, TrainLog], None] | None = None,
) -> TrainLog:
    """Train the parameters of `model` that require grad; call `on_step(step, log)` after each step.

    Deterministic: the data come from the seeded `stream`, the model has no
    dropout, and the caller fixes torch's seed and thread count.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=schedule.lr, betas=(0.9, 0.98), weight_decay=schedule.weight_decay
    )
    log = TrainLog(every=schedule.log_every)
    model.train()
    for step in range(1, schedule.steps + 1):
        lr = _lr_at(step, schedule.steps, schedule.lr, schedule.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels = make_batch(stream.take(schedule.batch_size), table)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.add(step, float(loss.detach()), lr, schedule.steps)
        if on_step is not None:
            on_step(step, log)
    model.eval()
    return log
