"""Weight schemes: where the weights of a merge come from when nobody searched them.

- uniform: w_i = 1/n (the uniform soup, Wortsman et al. 2022).
- metric-weighted averaging (MWA, after Yu & Choi 2025): w_i ∝ g_i^p, normalised to
  sum to one, with g_i = 1 / loss_i (lower training loss weighs more) or
  g_i = step_i (later checkpoints weigh more) and one penalty factor p ≥ 0;
  p = 0 is the uniform average and a larger p concentrates the weight.
  (The paper's exact formula was not available; this is the form its description
  fits. p stays a searchable parameter.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from recycler.errors import RecyclerError
from recycler.pool import Checkpoint

MwaMetric = Literal["loss", "step"]


def uniform_weights(n: int) -> list[float]:
    return [1.0 / n] * n


def mwa_weights_from_values(
    values: Sequence[float], metric: MwaMetric, penalty: float
) -> list[float]:
    """MWA weights from each checkpoint's training loss or step."""
    if penalty < 0:
        raise RecyclerError(f"mwa: penalty must be >= 0, got {penalty}")
    if any(v <= 0 for v in values):
        raise RecyclerError(f"mwa: every {metric} must be positive, got {list(values)}")
    goodness = [1.0 / v if metric == "loss" else float(v) for v in values]
    top = max(goodness)  # scaled first so that g^p cannot overflow
    raw = [(g / top) ** penalty for g in goodness]
    total = sum(raw)
    return [r / total for r in raw]


def mwa_weights(
    checkpoints: Sequence[Checkpoint], metric: MwaMetric = "loss", penalty: float = 0.5
) -> list[float]:
    """MWA weights read from each checkpoint's trainer_state.json."""
    values: list[float] = []
    for ckpt in checkpoints:
        state = ckpt.trainer_state()
        value = None if state is None else (state.loss if metric == "loss" else state.step)
        if value is None:
            raise RecyclerError(
                f"{ckpt.path}: no training {metric} for metric-weighted averaging (trainer_state.json)"
            )
        values.append(float(value))
    return mwa_weights_from_values(values, metric, penalty)
