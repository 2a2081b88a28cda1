"""`recycler front`: the Pareto set with weights and scores, what it beats, its hypervolume."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from recycler.config import StudySpec, load_study_spec
from recycler.errors import RecyclerError
from recycler.search.analysis import FrontSummary, Member, analyse
from recycler.search.study import StudyView, load_view


def format_weights(weights: dict[str, Any], *, drop_zero: bool = True) -> str:
    """{a: 0.5, b: 0.5, c: 0} → 'a=0.50 b=0.50'; grouped weights → 'a=0.50/0.40/0.10 ...'.

    Weights that round to 0.00 are left out (a single checkpoint reads as one name).
    """
    parts = []
    for name, w in weights.items():
        if isinstance(w, dict):
            values = [v for v in w.values() if isinstance(v, int | float)]
            if drop_zero and values and all(abs(v) < 0.005 for v in values):
                continue
            parts.append(f"{name}=" + "/".join(_num(v, 2) for v in w.values()))
        else:
            if drop_zero and isinstance(w, int | float) and abs(w) < 0.005:
                continue
            parts.append(f"{name}={_num(w, 2)}")
    return " ".join(parts) or "-"


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "n/a"


def _values(m: Member, n: int, with_mean: bool = False) -> list[str]:
    if m.values is None:
        return ["n/a"] * (n + int(with_mean))
    cells = [_num(v) for v in m.values]
    return [*cells, _num(sum(m.values) / len(m.values))] if with_mean else cells


def _has_mean(s: FrontSummary) -> bool:
    """A mean column reads well only when every objective points the same way."""
    return len(s.objectives) > 1 and len(set(s.maximize)) == 1


def summary_line(view: StudyView, spec: StudySpec) -> str:
    s = analyse(view, "dev")
    hv = "n/a" if s.hypervolume is None else f"{s.hypervolume:.4g}"
    knee = "" if s.knee is None else f", knee: trial {s.knee}"
    queued = sum(1 for r in view.trials if r.state == "WAITING")
    waiting = f", {queued} queued for a later run" if queued else ""
    return (
        f"study {spec.name}: {s.n_trials} trials ({s.n_complete} complete, {s.n_failed} failed{waiting}); "
        f"Pareto set of {len(s.members)}{knee}; hypervolume (dev) {hv}"
    )


def front_as_dict(s: FrontSummary, spec: StudySpec) -> dict[str, Any]:
    def entry(m: Member) -> dict[str, Any]:
        r = m.record
        return {
            "trial": r.number,
            "label": m.label,
            "knee": m.is_knee,
            "scores": dict(zip(s.objectives, m.values)) if m.values is not None else None,
            "weights": r.weights,
            "dominates": m.dominates,
            "merge_seconds": r.merge_seconds,
            "eval_seconds": r.eval_seconds,
            **(
                {"test_error": r.test_error}
                if s.split == "test" and r.test_error and m.values is None
                else {}
            ),
        }

    return {
        "study": spec.name,
        "storage": spec.storage,
        "split": s.split,
        "objectives": [
            {"name": n, "direction": "maximize" if up else "minimize"}
            for n, up in zip(s.objectives, s.maximize)
        ],
        "trials": {"total": s.n_trials, "complete": s.n_complete, "failed": s.n_failed},
        "hypervolume": s.hypervolume,
        "reference": s.reference,
        "knee": s.knee,
        "front": [entry(m) for m in s.members],
        "baselines": [entry(b) for b in s.baselines],
    }


def render_table(s: FrontSummary, spec: StudySpec, file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=160)
    arrows = ["↑" if up else "↓" for up in s.maximize]
    table = Table(
        title=f"Pareto set of study {spec.name} — scores on {s.split}", title_justify="left"
    )
    table.add_column("trial", justify="right")
    table.add_column("label")
    mean = _has_mean(s)
    for name, arrow in zip(s.objectives, arrows):
        table.add_column(f"{name} {arrow}", justify="right")
    if mean:
        table.add_column(f"mean {arrows[0]}", justify="right")
    table.add_column("weights")
    table.add_column("dominates")
    n_baselines = len({b.label for b in s.baselines if b.values is not None})
    for m in s.members:
        label = m.label + ("  (knee)" if m.is_knee else "")
        beaten = (
            f"all {n_baselines} baselines"
            if n_baselines > 2 and len(m.dominates) == n_baselines
            else ", ".join(m.dominates) or "-"
        )
        table.add_row(
            str(m.record.number),
            label,
            *_values(m, len(s.objectives), mean),
            format_weights(m.record.weights),
            beaten,
        )
    console.print(table)
    if s.baselines:
        base = Table(title=f"Baselines — scores on {s.split}", title_justify="left")
        base.add_column("trial", justify="right")
        base.add_column("baseline")
        for name, arrow in zip(s.objectives, arrows):
            base.add_column(f"{name} {arrow}", justify="right")
        if mean:
            base.add_column(f"mean {arrows[0]}", justify="right")
        base.add_column("dominated by (trials of the front)")
        for b in s.baselines:
            by = [str(m.record.number) for m in s.members if b.label in m.dominates]
            base.add_row(
                str(b.record.number),
                b.label,
                *_values(b, len(s.objectives), mean),
                ", ".join(by) or "-",
            )
        console.print(base)
    hv = "n/a" if s.hypervolume is None else f"{s.hypervolume:.6g}"
    ref = (
        ""
        if s.reference is None
        else " (reference: " + ", ".join(f"{v:.4g}" for v in s.reference) + ")"
    )
    console.print(f"hypervolume on {s.split}: {hv}{ref}")
    console.print(
        f"trials: {s.n_trials} ({s.n_complete} complete, {s.n_failed} failed); knee: trial {s.knee}"
    )
    if s.split != "dev" and any(m.values is None for m in s.members):
        console.print(
            "n/a: not scored on this split yet (`recycler search` re-scores the front when it finishes)"
        )


def render_csv(s: FrontSummary) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = sorted({n for m in [*s.members, *s.baselines] for n in m.record.weights})
    writer.writerow(
        ["trial", "role", "label", "knee", *s.objectives, *(f"w:{n}" for n in names), "dominates"]
    )
    rows = [("front", m) for m in s.members] + [
        ("baseline", b)
        for b in s.baselines
        if b.record.number not in {m.record.number for m in s.members}
    ]
    for role, m in rows:
        vals = [f"{v:.6g}" for v in m.values] if m.values is not None else [""] * len(s.objectives)
        ws = []
        for n in names:
            w = m.record.weights.get(n)
            ws.append(json.dumps(w) if isinstance(w, dict) else ("" if w is None else f"{w:.6g}"))
        writer.writerow(
            [m.record.number, role, m.label, int(m.is_knee), *vals, *ws, ";".join(m.dominates)]
        )
    return buf.getvalue()


def print_front(study_path: Path, fmt: str = "table", split: str = "dev") -> None:
    """`recycler front STUDY.yaml [--format table|csv|json] [--split dev|test]`."""
    spec = load_study_spec(study_path)
    if split not in ("dev", "test"):
        raise RecyclerError(f"--split: must be dev or test, got {split!r}")
    view = load_view(spec)
    summary = analyse(view, split)
    if not summary.members:
        raise RecyclerError(f"study {spec.name!r} has no completed trial yet; run recycler search")
    if fmt == "json":
        print(json.dumps(front_as_dict(summary, spec), indent=2))
    elif fmt == "csv":
        sys.stdout.write(render_csv(summary))
    elif fmt == "table":
        render_table(summary, spec)
    else:
        raise RecyclerError(f"--format: must be table, csv or json, got {fmt!r}")
