"""The zoo's LoRA run: a peft LoRA wrapper of the base, its saved adapters, its merged weights.

Adapters are written by peft's own `save_pretrained`, as real LoRA pools are;
recycler's pool reads them as base + delta. For scoring, the zoo takes the
merged weights from peft (`merge_and_unload` on a copy), so the score belongs
to the adapter exactly as peft applies it.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from recycler.zoo.spec import LoraRun

# Where an adapter's base lives, relative to the adapter's own directory
# (DIR/adapters/<name> -> DIR/base), so the zoo can be moved as a whole.
BASE_REF = "../../base"


def wrap(base: nn.Module, run: LoraRun) -> PeftModel:
    """A LoRA model over a copy of `base` (the base itself stays untouched)."""
    config = LoraConfig(
        r=run.rank,
        lora_alpha=run.alpha,
        lora_dropout=0.0,  # dropout would make the run depend on more random draws
        target_modules=list(run.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model: Any = copy.deepcopy(base)
    # peft records the wrapped model's `name_or_path` as the adapter's base.
    model.name_or_path = BASE_REF
    with warnings.catch_warnings():
        # peft probes a transformers attribute that transformers 5 deprecates.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        return get_peft_model(model, config)


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    # The embeddings are not adapted, so there is nothing to save of them; "auto"
    # would look for the base's config.json at BASE_REF from the working directory.
    model.save_pretrained(str(out_dir), save_embedding_layers=False)


def merged_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base weights with this adapter merged in, by the base model's tensor names."""
    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
