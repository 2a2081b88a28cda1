"""One Hugging Face model kept resident in memory; merged tensors are copied into it in place.

A search evaluates hundreds of merges of the same architecture. Loading a
model per trial would cost more than the evaluation itself, so the eval worker
loads one model once and overwrites its weights for each trial; lm-eval gets
that same object every time (through its HF wrapper, which accepts a model).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recycler.errors import RecyclerError

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _slots(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state tensors by name, and its tied names (alias -> the name that owns the storage).

    A tied lm_head shares its storage with the input embedding: checkpoints
    usually omit it, and copying into both would write the same memory twice.
    The first name seen for a storage (the embedding, in module order) owns it.
    """
    owners: dict[int, str] = {}
    slots: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    # keep_vars=True: the Parameters themselves, not detached views, so the
    # storage identity below is the real one.
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = tensor.data_ptr()
        if key in owners and tensor.numel() > 0:
            aliases[name] = owners[key]
        else:
            owners[key] = name
            slots[name] = tensor
    return slots, aliases


class ResidentModel:
    """A causal LM loaded once from `model_dir` (its config, tokenizer and initial weights).

    `load_tensors` replaces its weights in place; `lm(batch_size)` is the
    lm-eval wrapper around this very object, built once per batch size.
    """

    def __init__(
        self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RecyclerError(f"{model_dir}: no config.json, not a Hugging Face model directory")
        try:
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as exc:
            raise RecyclerError(f"{model_dir}: cannot load its tokenizer ({exc})") from None
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model: PreTrainedModel = model.to(device).eval()
        self.model_dir = model_dir
        self.device = torch.device(device)
        self.dtype = dtype
        self._slots, self._aliases = _slots(self.model)
        self._lms: dict[int, HFLM] = {}

    @property
    def tensor_names(self) -> list[str]:
        """The names `load_tensors` needs (tied aliases left out), in the model's order."""
        return list(self._slots)

    def owner(self, name: str) -> str:
        """The tensor `name` is stored as: a tied alias's owner (lm_head.weight -> the embedding), else itself."""
        return self._aliases.get(name, name)

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
        """Copy `tensors` into the resident model (cast to its dtype, moved to its device).

        Every name and shape is checked before anything is copied, so a bad
        input leaves the model as it was. A tied alias (lm_head.weight) is
        accepted and written through its owner unless the owner is given too.
        With `strict`, every tensor of the model must be given (a partial set is
        how a sharded merge delivers its pieces: pass strict=False for those).
        """
        plan: list[tuple[torch.Tensor, torch.Tensor]] = []
        given: set[str] = set()
        for name, value in tensors.items():
            owner = self.owner(name)
            if owner not in self._slots:
                raise RecyclerError(
                    f"tensor {name!r} is not a tensor of the model in {self.model_dir}"
                )
            if owner != name and owner in tensors:
                continue  # the owner's own value wins; the alias points at the same memory
            slot = self._slots[owner]
            if tuple(value.shape) != tuple(slot.shape):
                raise RecyclerError(
                    f"tensor {name!r}: shape {tuple(value.shape)} does not match the model's {tuple(slot.shape)}"
                )
            plan.append((slot, value))
            given.add(owner)
        if strict and (missing := [n for n in self._slots if n not in given]):
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise RecyclerError(
                f"missing tensors for the model in {self.model_dir}: {', '.join(missing[:3])}{more}"
            )
        with torch.no_grad():
            for slot, value in plan:
                slot.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The resident weights by name (views, tied aliases left out)."""
        return {name: t.detach() for name, t in self._slots.items()}

    def lm(self, batch_size: int = 32) -> HFLM:
        """lm-eval's HF wrapper around the resident model (not a copy), cached per batch size."""
        if batch_size not in self._lms:
            from lm_eval.models.huggingface import HFLM

            self._lms[batch_size] = HFLM(
                pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch_size
            )
        return self._lms[batch_size]
