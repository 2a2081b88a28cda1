"""Pareto sets, hypervolume and the knee: pure functions on arrays of objective values.

Rows are candidates, columns objectives; `maximize[j]` says which way objective j is
better. Nothing here knows Optuna: the same code serves the search's progress bar, the
`front` command, the report and the tests. Every function first turns the problem into
minimisation (negating maximised columns) so the algorithms are written once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


def _as_min(values: Array | Sequence[Sequence[float]], maximize: Sequence[bool]) -> Array:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        arr = arr.reshape(len(arr), -1) if arr.size else np.zeros((0, len(maximize)))
    if arr.shape[1] != len(maximize):
        raise ValueError(f"{arr.shape[1]} objective columns but {len(maximize)} directions")
    signs = np.where(np.asarray(maximize, dtype=bool), -1.0, 1.0)
    return arr * signs


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """a is no worse than b in every objective and better in at least one."""
    ma, mb = _as_min([a, b], maximize)
    return bool(np.all(ma <= mb) and np.any(ma < mb))


def pareto_mask(
    values: Array | Sequence[Sequence[float]], maximize: Sequence[bool]
) -> NDArray[np.bool_]:
    """True for the rows no other row dominates (duplicates of a front point all stay)."""
    y = _as_min(values, maximize)
    n = len(y)
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    # Lexicographic sort: a row can only be dominated by rows before it, so one pass that
    # checks each row against the front found so far is enough (Kung et al.'s idea).
    order = np.lexsort(y.T[::-1])
    front: list[int] = []
    for i in order:
        row = y[i]
        dominated = False
        for j in front:
            other = y[j]
            if np.all(other <= row) and np.any(other < row):
                dominated = True
                break
        if not dominated:
            front.append(int(i))
    mask[front] = True
    return mask


def nadir(
    values: Array | Sequence[Sequence[float]], maximize: Sequence[bool]
) -> NDArray[np.float64]:
    """The worst value of each objective over the rows: the hypervolume's reference point."""
    arr = np.asarray(values, dtype=np.float64)
    worst = [arr[:, j].min() if up else arr[:, j].max() for j, up in enumerate(maximize)]
    return np.asarray(worst, dtype=np.float64)


def hypervolume(
    values: Array | Sequence[Sequence[float]],
    reference: Sequence[float] | NDArray[np.float64],
    maximize: Sequence[bool],
) -> float:
    """The volume the rows dominate up to `reference` (exact; rows beyond it add nothing)."""
    y = _as_min(values, maximize)
    ref = _as_min([list(reference)], maximize)[0]
    if len(y) == 0:
        return 0.0
    y = y[np.all(y < ref, axis=1)]
    if len(y) == 0:
        return 0.0
    return float(_hv_min(y, ref))


def hypervolume_contributions(
    values: Array | Sequence[Sequence[float]],
    reference: Sequence[float] | NDArray[np.float64],
    maximize: Sequence[bool],
) -> NDArray[np.float64]:
    """Each row's exclusive hypervolume contribution: the volume it dominates up to
    `reference` that no other row does (all rows' hypervolume less the others').

    Computed per row as its box up to the reference less the hypervolume of the other
    rows clipped to that box (each other row moved to its worse side of this one), which
    is far smaller than the others' whole hypervolume. A row equal to another adds
    nothing of its own: both get 0.
    """
    y = _as_min(values, maximize)
    ref = _as_min([list(reference)], maximize)[0]
    out = np.zeros(len(y), dtype=np.float64)
    for i, row in enumerate(y):
        if not np.all(row < ref):
            continue
        clipped = np.maximum(np.delete(y, i, axis=0), row)
        clipped = clipped[np.all(clipped < ref, axis=1)]
        covered = _hv_min(clipped, ref) if len(clipped) else 0.0
        out[i] = max(0.0, float(np.prod(ref - row)) - covered)  # rounding: never below 0
    return out


def estimated_contributions(
    values: Array | Sequence[Sequence[float]],
    reference: Sequence[float] | NDArray[np.float64],
    maximize: Sequence[bool],
    seed: int,
    samples: int = 1 << 15,
) -> NDArray[np.float64]:
    """`hypervolume_contributions` estimated from `samples` seeded uniform points of the
    box between the rows' best values and `reference`: each point dominated by exactly
    one row counts for that row. Linear in rows, objectives and samples, where the exact
    contributions grow exponentially with the objectives."""
    y = _as_min(values, maximize)
    ref = _as_min([list(reference)], maximize)[0]
    low = np.minimum(y.min(axis=0), ref)
    rng = np.random.default_rng(seed)
    credit = np.zeros(len(y), dtype=np.float64)
    for start in range(0, samples, 4096):
        points = rng.uniform(low, ref, size=(min(4096, samples - start), len(ref)))
        covers = np.all(y[None, :, :] <= points[:, None, :], axis=2)  # sample × row
        alone = covers.sum(axis=1) == 1
        np.add.at(credit, np.argmax(covers[alone], axis=1), 1.0)
    return credit * float(np.prod(ref - low)) / samples


def _hv_min(points: Array, ref: Array) -> float:
    """Hypervolume for minimisation by slicing along the last objective (HSO).

    O(n^(m-1)) is plenty for the tens to hundreds of trials of a merge search.
    """
    points = points[pareto_mask(points, [False] * points.shape[1])]
    m = points.shape[1]
    if m == 1:
        return float(ref[0] - points[:, 0].min())
    if m == 2:
        order = np.argsort(points[:, 0], kind="stable")
        volume, best_y = 0.0, float(ref[1])
        for x, y in points[order]:
            if y < best_y:
                volume += (ref[0] - x) * (best_y - y)
                best_y = float(y)
        return volume
    order = np.argsort(points[:, -1], kind="stable")
    sorted_pts = points[order]
    volume = 0.0
    for k in range(len(sorted_pts)):
        upper = sorted_pts[k + 1, -1] if k + 1 < len(sorted_pts) else ref[-1]
        depth = float(upper - sorted_pts[k, -1])
        if depth > 0:
            volume += depth * _hv_min(sorted_pts[: k + 1, :-1], ref[:-1])
    return volume


def knee_index(front_values: Array | Sequence[Sequence[float]], maximize: Sequence[bool]) -> int:
    """The front member closest to the ideal point once each objective is scaled to [0, 1].

    Scaling over the front makes objectives of different units comparable; an objective
    constant over the front drops out. Ties go to the earlier row.
    """
    y = _as_min(front_values, maximize)
    if len(y) == 0:
        raise ValueError("an empty front has no knee")
    low, high = y.min(axis=0), y.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    scaled = (y - low) / span
    distance = np.sqrt((scaled**2).sum(axis=1))
    return int(np.argmin(distance))


def dominated_rows(
    front_values: Array | Sequence[Sequence[float]],
    others: Array | Sequence[Sequence[float]],
    maximize: Sequence[bool],
) -> list[list[int]]:
    """For each front row, the indexes of the `others` rows it dominates."""
    f = _as_min(front_values, maximize)
    o = _as_min(others, maximize)
    out: list[list[int]] = []
    for row in f:
        hits = np.all(row <= o, axis=1) & np.any(row < o, axis=1) if len(o) else np.zeros(0, bool)
        out.append([int(i) for i in np.flatnonzero(hits)])
    return out


def hypervolume_history(
    values: Array | Sequence[Sequence[float]],
    maximize: Sequence[bool],
    reference: Sequence[float] | None = None,
) -> list[float]:
    """Hypervolume of the first k rows for k = 1..n, against one fixed reference point.

    The reference defaults to the nadir of all rows, so the curve never decreases.
    """
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) == 0:
        return []
    ref = nadir(arr, maximize) if reference is None else np.asarray(reference, dtype=np.float64)
    return [hypervolume(arr[: k + 1], ref, maximize) for k in range(len(arr))]
