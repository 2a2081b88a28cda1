"""`recycler zoo build DIR`: train the demo pool, write its tasks, score it, mark it complete.

DIR/
  base/                     the pretrained model + character tokenizer
  checkpoints/<run>-step<N>/  full fine-tuning checkpoints (+ trainer_state.json)
  adapters/<run>-step<N>/   peft LoRA adapters (+ trainer_state.json)
  tasks/                    lm-eval task YAMLs + data (see tasks.py)
  study.yaml                a ready study over checkpoints/*
  scores.json               dev/test scores of base, checkpoints, adapters, uniform soup
  .zoo-complete.json        written last: its presence means the build finished

The model is a tiny Llama by default; `architecture="qwen2"` builds the same pool
of Qwen2 models instead (same shapes, same training; Qwen2 adds q/k/v biases).

A build that finds the marker (same size, seed and architecture) returns at once;
one that finds a half-written zoo (its `.zoo-building` flag) clears it and starts
over. A file lock makes concurrent builds of one DIR wait for each other.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from recycler.errors import RecyclerError
from recycler.zoo.spec import Run, ZooSpec, get_spec

MARKER = ".zoo-complete.json"
BUILDING = ".zoo-building"
LOCK = ".zoo.lock"
# Bump when the zoo's contents change, so an old cached build is not reused.
BUILD_VERSION = 5
# The decoder families a pool can be built of (transformers' model types; `_pretrain`
# maps each to its classes, imported there only when a pool is trained).
ARCHITECTURES = ("llama", "qwen2")
# Markers record the architecture only when it is not this one, so the markers of
# the Llama pools built before the choice existed still match (and stay unchanged).
DEFAULT_ARCHITECTURE = "llama"
_OURS = (
    "base",
    "checkpoints",
    "adapters",
    "tasks",
    "study.yaml",
    "scores.json",
    "quality.json",
    MARKER,
    MARKER + ".tmp",
    BUILDING,
    LOCK,
)


def build_zoo(
    out_dir: Path,
    size: str = "small",
    seed: int = 0,
    *,
    architecture: str = DEFAULT_ARCHITECTURE,
    quiet: bool = False,
) -> Path:
    """Build (or reuse) the demo pool of `size` and `architecture` in `out_dir`; return
    `out_dir`."""
    spec = get_spec(size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RecyclerError(f"zoo seed: must be a non-negative integer, got {seed!r}")
    if architecture not in ARCHITECTURES:
        raise RecyclerError(
            f"zoo architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecyclerError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    want: dict[str, Any] = {"size": size, "seed": seed, "version": BUILD_VERSION}
    if architecture != DEFAULT_ARCHITECTURE:
        want["architecture"] = architecture
    with _locked(out_dir / LOCK):
        if prepare(out_dir, want):
            return out_dir
        (out_dir / BUILDING).write_text("a zoo build started here and has not finished\n")
        say = _Progress(quiet)
        summary = _build(out_dir, spec, seed, architecture, say)
        tmp = out_dir / (MARKER + ".tmp")
        tmp.write_text(json.dumps({**want, **summary}, indent=2) + "\n")
        os.replace(tmp, out_dir / MARKER)
        (out_dir / BUILDING).unlink()
        say(f"zoo ready in {out_dir} ({summary['seconds']['total']:.0f} s)")
    return out_dir


def prepare(out_dir: Path, want: dict[str, Any]) -> bool:
    """True when `out_dir` holds a complete zoo built as `want` says (reuse it).

    Otherwise clear what an interrupted build left and return False; refuse
    (RecyclerError) a complete zoo of another size/seed/architecture/version, or a
    folder holding files a zoo never writes. A marker or `want` without "architecture"
    means the default one.
    """
    done = read_marker(out_dir)
    if done is not None and _matches(done, want):
        return True
    if done is not None:
        raise RecyclerError(
            f"{out_dir}: holds a zoo built with size={done.get('size')}, seed={done.get('seed')}, "
            f"architecture={done.get('architecture', DEFAULT_ARCHITECTURE)}, "
            f"version={done.get('version')}; delete it or choose another directory"
        )
    strangers = sorted(p.name for p in out_dir.iterdir() if p.name not in _OURS)
    if strangers:
        raise RecyclerError(
            f"{out_dir}: not empty and not a zoo (found {strangers[0]}); choose an empty directory"
        )
    _clear(out_dir)
    return False


def _matches(done: dict[str, Any], want: dict[str, Any]) -> bool:
    # Without the default filled in on both sides, a Llama request (no key) would
    # match a Qwen2 marker, since only `want`'s keys are compared.
    want = {"architecture": DEFAULT_ARCHITECTURE, **want}
    done = {"architecture": DEFAULT_ARCHITECTURE, **done}
    return {k: done.get(k) for k in want} == want


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The completion marker's contents, or None when the zoo in `out_dir` is not complete."""
    path = Path(out_dir) / MARKER
    if not path.is_file() or (Path(out_dir) / BUILDING).exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clear(out_dir: Path) -> None:
    for name in _OURS:
        path = out_dir / name
        if name == LOCK:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class _Progress:
    """One line per stage on stderr (a small build takes minutes; silence would look hung)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(
                f"[zoo {time.perf_counter() - self.start:6.1f}s] {message}",
                file=sys.stderr,
                flush=True,
            )


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """One torch thread, no transformers progress bars; restored afterwards.

    One thread: the zoo's matrices are tiny, so a second thread mostly adds
    synchronisation, and on a busy two-core machine it made steps ~10x slower.
    A fixed thread count also keeps float reductions, hence the scores, identical
    from build to build.
    """
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


class _Laps:
    """Seconds per build stage, each lap from the end of the one before."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._clock, 2)
        self._clock = now


def _build(
    out_dir: Path, spec: ZooSpec, seed: int, architecture: str, say: _Progress
) -> dict[str, Any]:
    """Tasks, base, fine-tuning runs, LoRA run, scores and study, in that order: every
    stage draws from torch's generator after the one before, so the order is part of
    what makes two builds of one seed byte-identical."""
    # Imported only when a pool is trained: reusing a built one (the demo's second run,
    # the tests, the experiments) must not wait for transformers, peft and datasets.
    from recycler.zoo.scoring import score_zoo
    from recycler.zoo.skills import eval_sets
    from recycler.zoo.study import write_study
    from recycler.zoo.tasks import write_tasks
    from recycler.zoo.tokenizer import vocab

    lap = _Laps()
    with quiet_libraries():
        data = eval_sets(seed, spec.eval_per_split)
        # No training example is one of the tasks' prompts.
        exclude = {e.prompt for splits in data.values() for exs in splits.values() for e in exs}
        task_names = write_tasks(out_dir / "tasks", data)
        table = vocab()
        lap("tasks")

        say(f"pretraining the {architecture} base ({spec.pretrain.steps} steps)")
        base = _pretrain(out_dir, spec, seed, architecture, table, exclude)
        lap("pretrain")

        checkpoint_dirs = [
            path
            for run in spec.runs
            for path in _finetune(out_dir, run, seed, base, table, exclude, say)
        ]
        lap("finetune")

        say(f"LoRA run {spec.lora.name} ({spec.lora.schedule.steps} steps)")
        adapters = _lora_run(out_dir, spec, seed, base, table, exclude)
        lap("lora")

        say(f"scoring {1 + len(checkpoint_dirs) + len(adapters) + 1} models with lm-eval")
        scores = score_zoo(out_dir, spec, checkpoint_dirs, adapters, [*task_names])
        (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        write_study(out_dir, spec, task_names)
        lap("score")
    seconds = {**lap.seconds, "total": round(sum(lap.seconds.values()), 2)}
    return {"seconds": seconds, "checkpoints": len(checkpoint_dirs), "adapters": len(adapters)}


def _pretrain(
    out_dir: Path,
    spec: ZooSpec,
    seed: int,
    architecture: str,
    table: dict[str, int],
    exclude: set[str],
) -> Any:
    """The base model of `architecture`, trained from a seeded initialisation and saved to
    out_dir/base."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from recycler.zoo import checkpoints as ck
    from recycler.zoo.skills import TrainStream
    from recycler.zoo.tokenizer import PAD_ID, save_tokenizer
    from recycler.zoo.train import train

    # Both take the same shape fields; a Qwen2 model differs by its q/k/v biases.
    classes: dict[str, tuple[Any, Any]] = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    config_class, model_class = classes[architecture]
    shape = spec.shape
    config = config_class(
        vocab_size=len(table),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=table["<bos>"],
        eos_token_id=table["<eos>"],
    )
    torch.manual_seed(seed)
    base = model_class(config)
    stream = TrainStream(spec.pretrain_mixture, exclude, f"{seed}-pretrain", spec.pretrain_noise)
    train(base, stream, table, spec.pretrain)
    ck.save_full(base, out_dir / "base", torch.float32, None)
    save_tokenizer(out_dir / "base")
    return base


def _finetune(
    out_dir: Path,
    run: Run,
    seed: int,
    base: Any,
    table: dict[str, int],
    exclude: set[str],
    say: _Progress,
) -> list[Path]:
    """One fine-tuning run from a copy of the base: the checkpoints it saves, in order."""
    from recycler.zoo import checkpoints as ck
    from recycler.zoo.skills import TrainStream
    from recycler.zoo.tokenizer import save_tokenizer
    from recycler.zoo.train import train, trainer_state, write_trainer_state

    say(f"fine-tuning run {run.name} ({run.schedule.steps} steps, lr {run.schedule.lr:g})")
    model = copy.deepcopy(base)
    saves = {s.step: s for s in run.saves}
    saved: list[Path] = []

    def save(step: int, log: Any) -> None:
        if step not in saves:
            return
        target = out_dir / "checkpoints" / f"{run.name}-step{step:04d}"
        ck.save_full(model, target, saves[step].dtype, saves[step].max_shard_size)
        save_tokenizer(target)
        write_trainer_state(
            target, trainer_state(log, step, run.schedule.steps, run.schedule.batch_size)
        )
        saved.append(target)

    stream = TrainStream(run.mixture, exclude, f"{seed}-{run.name}")
    train(model, stream, table, run.schedule, on_step=save)
    return saved


def _lora_run(
    out_dir: Path, spec: ZooSpec, seed: int, base: Any, table: dict[str, int], exclude: set[str]
) -> dict[Path, dict[str, torch.Tensor]]:
    """The LoRA run on the base: each saved adapter's folder → its merged weights."""
    from recycler.zoo import lora
    from recycler.zoo.skills import TrainStream
    from recycler.zoo.train import train, trainer_state, write_trainer_state

    torch.manual_seed(seed + 1)  # LoRA's A matrices are drawn at random
    peft_model = lora.wrap(base, spec.lora)
    adapters: dict[Path, dict[str, torch.Tensor]] = {}
    schedule = spec.lora.schedule

    def save_adapter(step: int, log: Any) -> None:
        if step not in spec.lora.save_steps:
            return
        target = out_dir / "adapters" / f"{spec.lora.name}-step{step:04d}"
        lora.save_adapter(peft_model, target)
        write_trainer_state(target, trainer_state(log, step, schedule.steps, schedule.batch_size))
        adapters[target] = lora.merged_weights(peft_model)

    stream = TrainStream(spec.lora.mixture, exclude, f"{seed}-{spec.lora.name}")
    train(peft_model, stream, table, schedule, on_step=save_adapter)
    return adapters
