"""A checkpoint seen under another model's tensor names: one slice of its layers, renumbered.

A `slices:` recipe takes layers [a, b) of a model to be layers [o, o + b − a) of the
output. `LayerView` shows the checkpoint's tensors under the output's names (layer
a + j as layer o + j, the tensors outside the layers under their own names where the
slice merges them), so a pool of views merges with the ordinary engine. Reads go to
the checkpoint itself; nothing is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from recycler.merge.conditional import layer_index, with_layer_index
from recycler.pool.checkpoint import Checkpoint, StoredTensor, TrainerState
from recycler.pool.safetensors_file import TensorInfo

if TYPE_CHECKING:
    import torch


class LayerView(Checkpoint):
    def __init__(
        self,
        inner: Checkpoint,
        layer_range: tuple[int, int],
        first_out_layer: int,
        outside: frozenset[str],
    ) -> None:
        """Layers `layer_range` of `inner` as output layers from `first_out_layer`; of the
        tensors outside the layers, those named in `outside` are shown (the others can still
        be read, for a tied head)."""
        super().__init__(inner.path)
        self.name = inner.name
        self.inner = inner
        self.layer_range = layer_range
        self._n_layers = layer_range[1] - layer_range[0]
        self._shown: dict[str, str] = {}
        self._readable: dict[str, str] = {}
        for name in inner.stored_names():
            index = layer_index(name)
            if index is None:
                self._readable[name] = name
                if name in outside:
                    self._shown[name] = name
            elif layer_range[0] <= index < layer_range[1]:
                out = with_layer_index(name, first_out_layer + index - layer_range[0])
                self._shown[out] = self._readable[out] = name

    def stored_names(self) -> list[str]:
        return list(self._shown)

    def has(self, name: str) -> bool:
        return name in self.aliases or name in self._readable

    def _info(self, name: str) -> TensorInfo:
        return self.inner.info(self._readable[name])

    def _read(self, name: str) -> torch.Tensor:
        return self.inner.read(self._readable[name])

    def locate(self, name: str) -> StoredTensor | None:
        return self.inner.locate(self._readable[self.aliases.get(name, name)])

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(self._readable[self.aliases.get(name, name)])

    def release(self, name: str) -> None:
        self.inner.release(self._readable[self.aliases.get(name, name)])

    def files(self) -> list[Path]:
        return self.inner.files()

    @property
    def directory(self) -> Path:
        return self.inner.directory

    def config(self) -> dict[str, Any] | None:
        """The checkpoint's config for the slice: as many layers as the slice has (layer
        gradients spread over them)."""
        config = self.inner.config()
        if config is None:
            return None
        return {**config, **{k: self._n_layers for k in LAYER_COUNT_KEYS if k in config}}

    def trainer_state(self) -> TrainerState | None:
        return self.inner.trainer_state()


# config.json keys that count the layers.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
