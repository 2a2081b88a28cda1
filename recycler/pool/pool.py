"""A pool: the checkpoints to merge (and their base), indexed and checked together.

`Pool.open` reads headers only. Before any merge it checks that every checkpoint
holds every tensor of the reference (the base, else the first checkpoint) with the
same shape, and fails with one line naming the checkpoint, the tensor and what is
wrong. A tied `lm_head` that one checkpoint stores and another omits is read from
the input embedding of the one that omits it.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from recycler.errors import RecyclerError
from recycler.pool.checkpoint import Checkpoint, open_checkpoint
from recycler.pool.safetensors_file import TensorInfo

# Output heads that transformers ties to an input embedding, with that embedding's name.
_TIED_PAIRS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
)


class Pool:
    def __init__(self, checkpoints: list[Checkpoint], base: Checkpoint | None) -> None:
        if not checkpoints:
            raise RecyclerError("the pool has no checkpoints")
        self.checkpoints = checkpoints
        self.base = base
        reference = base if base is not None else checkpoints[0]
        self.reference = reference
        self.tensor_names = reference.stored_names()
        for ckpt in [*([base] if base is not None else []), *checkpoints]:
            _check_against(ckpt, reference, self.tensor_names)

    @classmethod
    def open(
        cls,
        checkpoints: Sequence[str | Path],
        base: str | Path | None = None,
        *,
        allow_pickle: bool = False,
        root: Path | None = None,
    ) -> Pool:
        """Open a pool; paths are relative to `root` (default: the working directory), globs allowed."""
        root = root or Path.cwd()
        base_path = _resolve(base, root) if base is not None else None
        paths = expand_paths(checkpoints, root)
        if base_path is not None:
            # A glob over a folder that also holds the base does not make the base a member.
            paths = [p for p in paths if p.resolve() != base_path.resolve()]
        return cls.from_paths(paths, base_path, allow_pickle=allow_pickle)

    @classmethod
    def from_paths(
        cls, paths: Sequence[Path], base: Path | None, *, allow_pickle: bool = False
    ) -> Pool:
        """Open exactly these checkpoints, in this order (a recipe's models)."""
        base_ckpt = (
            open_checkpoint(base, base=None, allow_pickle=allow_pickle)
            if base is not None
            else None
        )
        opened = [open_checkpoint(p, base=base_ckpt, allow_pickle=allow_pickle) for p in paths]
        _make_names_unique(opened)
        return cls(opened, base_ckpt)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.checkpoints]

    def info(self, name: str) -> TensorInfo:
        return self.reference.info(name)

    @property
    def config_dir(self) -> Path:
        """The dir whose config.json and tokenizer describe the merged model."""
        for ckpt in [self.base, *self.checkpoints]:
            if ckpt is not None and (ckpt.directory / "config.json").is_file():
                return ckpt.directory
        raise RecyclerError(
            "no checkpoint of the pool has a config.json (a bare .safetensors pool needs a base dir)"
        )

    @property
    def n_layers(self) -> int:
        config = self.reference.config() or {}
        value = config.get("num_hidden_layers") or config.get("n_layer") or 0
        return int(value)

    def close(self) -> None:
        for ckpt in [self.base, *self.checkpoints]:
            if ckpt is not None:
                ckpt.close()


def expand_paths(entries: Sequence[str | Path], root: Path) -> list[Path]:
    """Checkpoint paths with globs expanded (sorted), relative ones taken from `root`."""
    out: list[Path] = []
    for entry in entries:
        text = str(entry)
        if any(ch in text for ch in "*?["):
            pattern = text if Path(text).is_absolute() else str(root / text)
            matches = sorted(Path(m) for m in glob.glob(pattern))
            if not matches:
                raise RecyclerError(f"pool.checkpoints: {text!r} matches nothing")
            out.extend(matches)
        else:
            out.append(_resolve(entry, root))
    unique: dict[Path, Path] = {}
    for p in out:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _resolve(path: str | Path, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _make_names_unique(checkpoints: list[Checkpoint]) -> None:
    """Short names for tables and user attributes; parent dir added where two collide."""
    seen: dict[str, int] = {}
    for c in checkpoints:
        seen[c.name] = seen.get(c.name, 0) + 1
    for c in checkpoints:
        if seen[c.name] > 1:
            c.name = (
                f"{c.directory.parent.name if c.path.is_dir() else c.path.parent.name}/{c.name}"
            )


def _is_tied(ckpt: Checkpoint) -> bool:
    config = ckpt.config()
    # A bare tensor file says nothing; then a missing head can only be a tied one.
    return config is None or bool(config.get("tie_word_embeddings", False))


def _check_against(ckpt: Checkpoint, reference: Checkpoint, names: list[str]) -> None:
    for head, embedding in _TIED_PAIRS:
        if head in names and not ckpt.has(head) and ckpt.has(embedding) and _is_tied(ckpt):
            ckpt.aliases[head] = embedding
    for name in names:
        if not ckpt.has(name):
            raise RecyclerError(
                f"{ckpt.path}: tensor {name}: missing (present in {reference.path})"
            )
        got, want = ckpt.info(name), reference.info(name)
        if got.shape != want.shape:
            hint = (
                " (vocabulary size differs)"
                if "embed" in name or "lm_head" in name or "wte" in name
                else ""
            )
            raise RecyclerError(
                f"{ckpt.path}: tensor {name}: shape {list(got.shape)} but {reference.path} has {list(want.shape)}{hint}"
            )
        if got.is_floating_point != want.is_floating_point:
            raise RecyclerError(
                f"{ckpt.path}: tensor {name}: dtype {got.code} cannot merge with {want.code} of {reference.path}"
            )
