"""What each zoo size trains: model shape, pretraining, fine-tuning runs, LoRA run, eval sizes.

The numbers were tuned (see README.md beside this file) so that the base is
mediocre at every skill, each run trades skills against each other, merges of
the runs beat every single checkpoint, and the build fits its time budget on
two CPU cores (micro: under a minute; small: a few minutes, limit 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from recycler.errors import RecyclerError
from recycler.zoo.train import Schedule


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 32


@dataclass(frozen=True)
class Save:
    """One checkpoint of a run: the step, the dtype it is written in, and the shard size (None: one file)."""

    step: int
    dtype: torch.dtype = torch.float32
    max_shard_size: str | None = None


@dataclass(frozen=True)
class Run:
    """A fine-tuning run of the base: its data mixture, schedule and saved checkpoints."""

    name: str
    mixture: dict[str, float]
    schedule: Schedule
    saves: tuple[Save, ...]


@dataclass(frozen=True)
class LoraRun:
    name: str
    mixture: dict[str, float]
    schedule: Schedule
    save_steps: tuple[int, ...]
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )


@dataclass(frozen=True)
class ZooSpec:
    size: str
    shape: ModelShape
    pretrain_mixture: dict[str, float]
    pretrain_noise: dict[str, float]
    pretrain: Schedule
    runs: tuple[Run, ...]
    lora: LoraRun
    eval_per_split: int  # questions per skill in each of dev and test
    eval_batch_size: int = 64
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def n_checkpoints(self) -> int:
        return sum(len(r.saves) for r in self.runs)


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
_ALL = {"inc": 1.0, "dec": 1.0, "rev": 1.0, "rot": 1.0, "sort": 0.5}
# Share of pretraining answers that are the partner skill's (see skills.TrainStream):
# the base learns every skill but half-confuses the pairs, so it is mediocre at all
# and a short, low-lr fine-tune (a small delta) settles a pair one way.
_NOISE = {"inc": 0.4, "dec": 0.4, "rev": 0.4, "rot": 0.4, "sort": 0.3}

MICRO = ZooSpec(
    size="micro",
    shape=ModelShape(hidden=48, layers=2, intermediate=144),
    pretrain_mixture=_ALL,
    pretrain_noise=_NOISE,
    pretrain=Schedule(steps=300, lr=3e-3, batch_size=64, warmup=20, weight_decay=0.01),
    runs=(
        Run(
            "digits",
            {"inc": 1.0, "dec": 1.0},
            Schedule(steps=60, lr=5e-4, batch_size=64, warmup=5),
            (Save(30, FP32), Save(60, BF16, "100KB")),
        ),
        Run(
            "letters",
            {"rev": 1.0, "rot": 1.0},
            Schedule(steps=60, lr=5e-4, batch_size=64, warmup=5),
            (Save(60, FP16),),
        ),
        Run(
            "inc-rev",
            {"inc": 1.0, "rev": 1.0},
            Schedule(steps=40, lr=8e-4, batch_size=64, warmup=5),
            (Save(40, FP32, "100KB"),),
        ),
    ),
    lora=LoraRun(
        "lora-dec-rot",
        {"dec": 1.0, "rot": 1.0},
        Schedule(steps=45, lr=2e-3, batch_size=64, warmup=5),
        (15, 30, 45),
        rank=4,
        alpha=8,
    ),
    eval_per_split=40,
)

SMALL = ZooSpec(
    size="small",
    shape=ModelShape(hidden=64, layers=2, intermediate=192),
    pretrain_mixture=_ALL,
    pretrain_noise=_NOISE,
    pretrain=Schedule(steps=800, lr=3e-3, batch_size=64, warmup=30, weight_decay=0.01),
    runs=(
        # Two runs on a pair each, two on a cross of the pairs with a little of
        # the other two skills (as fine-tuning mixtures often replay some).
        Run(
            "digits",
            {"inc": 1.0, "dec": 1.0},
            Schedule(steps=200, lr=2e-4, batch_size=64, warmup=10),
            (Save(100, FP32), Save(200, BF16, "200KB")),
        ),
        Run(
            "letters",
            {"rev": 1.0, "rot": 1.0},
            Schedule(steps=240, lr=2e-4, batch_size=64, warmup=10),
            (Save(80, FP16), Save(160, FP32, "200KB"), Save(240, BF16)),
        ),
        Run(
            "inc-rev",
            {"inc": 1.0, "rev": 1.0, "dec": 0.15, "rot": 0.15},
            Schedule(steps=120, lr=4e-4, batch_size=64, warmup=10),
            (Save(60, FP32), Save(120, FP32, "200KB")),
        ),
        Run(
            "dec-rot",
            {"dec": 1.0, "rot": 1.0, "inc": 0.15, "rev": 0.15},
            Schedule(steps=300, lr=1.5e-4, batch_size=64, warmup=10),
            (Save(150, BF16, "200KB"), Save(300, FP32)),
        ),
    ),
    lora=LoraRun(
        "lora-inc-rot",
        {"inc": 1.0, "rot": 1.0},
        Schedule(steps=150, lr=5e-4, batch_size=64, warmup=10),
        (50, 100, 150),
    ),
    eval_per_split=200,
)

SIZES = {s.size: s for s in (MICRO, SMALL)}


def get_spec(size: str) -> ZooSpec:
    try:
        return SIZES[size]
    except KeyError:
        raise RecyclerError(f"zoo size must be one of {', '.join(SIZES)}, got {size!r}") from None
