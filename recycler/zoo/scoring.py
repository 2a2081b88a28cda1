"""Score every model of a freshly trained zoo with recycler's evaluator (→ scores.json).

The weights are read back from the files just written (a bf16 checkpoint is
scored as bf16 weights, not as the fp32 ones it was saved from), copied into
one resident model and scored by lm-eval on both splits: the path a search
takes, so the numbers agree with what a search reports for the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recycler.evaluate.model import ResidentModel
from recycler.evaluate.runner import evaluate_tasks
from recycler.zoo import checkpoints as ck
from recycler.zoo.soup import linear_merge
from recycler.zoo.spec import ZooSpec
from recycler.zoo.tasks import GROUP, SPLITS

# The dtype the zoo is scored in, and the one its study merges in: the
# fine-tuning deltas are a few percent of the weights, and bf16's 8-bit
# mantissa would blur part of them away.
SCORE_DTYPE = torch.float32


class Scorer:
    """One resident model over the zoo's base, scoring weight sets on the zoo's task group."""

    def __init__(self, zoo_dir: Path, batch_size: int = 64) -> None:
        self.zoo_dir = Path(zoo_dir)
        self.model = ResidentModel(self.zoo_dir / "base", device="cpu", dtype=SCORE_DTYPE)
        self.batch_size = batch_size

    def score(
        self, weights: Mapping[str, torch.Tensor], splits: Sequence[str] = SPLITS
    ) -> dict[str, dict[str, dict[str, float]]]:
        """split -> task -> metric -> value for these weights."""
        self.model.load_tensors(weights)
        return {
            split: evaluate_tasks(
                self.model, self.zoo_dir / "tasks", [GROUP], split, batch_size=self.batch_size
            )
            for split in splits
        }


def _trainer_facts(model_dir: Path) -> dict[str, Any]:
    state = json.loads((model_dir / "trainer_state.json").read_text())
    history = [h for h in state["log_history"] if "loss" in h]
    return {"step": state["global_step"], "loss": history[-1]["loss"] if history else None}


def score_zoo(
    zoo_dir: Path,
    spec: ZooSpec,
    checkpoint_dirs: Sequence[Path],
    adapters: Mapping[Path, Mapping[str, torch.Tensor]],
    task_names: list[str],
) -> dict[str, Any]:
    """The scores.json document: base, every checkpoint, every adapter, the uniform soup."""
    scorer = Scorer(zoo_dir, spec.eval_batch_size)
    models: dict[str, dict[str, Any]] = {}

    def rel(path: Path) -> str:
        return str(path.relative_to(zoo_dir))

    models["base"] = {
        "kind": "base",
        "path": "base",
        **scorer.score(ck.read_full(zoo_dir / "base")),
    }
    for d in checkpoint_dirs:
        models[d.name] = {
            "kind": "checkpoint",
            "path": rel(d),
            "run": d.name.rsplit("-step", 1)[0],
            **_trainer_facts(d),
            "dtype": ck.stored_dtype(d),
            "sharded": ck.is_sharded(d),
            **scorer.score(ck.read_full(d)),
        }
    for d, merged in adapters.items():
        models[d.name] = {
            "kind": "adapter",
            "path": rel(d),
            "run": d.name.rsplit("-step", 1)[0],
            **_trainer_facts(d),
            **scorer.score(merged),
        }
    members = list(checkpoint_dirs)
    soup = linear_merge(members, [1.0] * len(members), dtype="float32")
    models["uniform_soup"] = {
        "kind": "soup",
        "members": [rel(d) for d in members],
        **scorer.score(soup),
    }
    return {
        "size": spec.size,
        "metric": "acc",
        "score_dtype": str(SCORE_DTYPE).removeprefix("torch."),
        "group": GROUP,
        "tasks": task_names,
        "splits": list(SPLITS),
        "questions_per_split": spec.eval_per_split,
        "models": models,
    }
