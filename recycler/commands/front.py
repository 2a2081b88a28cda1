"""`recycler front STUDY.yaml [--format table|csv|json] [--split dev|test]`: the Pareto
set with weights and scores, what it beats, its hypervolume."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from recycler.config import StudySpec, load_study_spec
from recycler.errors import RecyclerError
from recycler.search.analysis import (
    FrontSummary,
    Member,
    analyse,
    describe_doc_split,
    describe_strata,
    format_number,
    format_recipe,
    format_score,
)
from recycler.search.storage import shown
from recycler.search.stored import StudyView
from recycler.search.study import load_view


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", type=Path)
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.add_argument("--split", choices=["dev", "test"], default="dev")


def run(args: argparse.Namespace) -> None:
    spec = load_study_spec(args.study)
    view = load_view(spec)
    summary = analyse(view, args.split)
    if not summary.members:
        raise RecyclerError(f"study {spec.name!r} has no completed trial yet; run recycler search")
    if args.format == "json":
        print(json.dumps(front_as_dict(summary, spec, view.doc_split, view.strata), indent=2))
    elif args.format == "csv":
        sys.stdout.write(render_csv(summary))
    else:
        render_table(summary, spec)
        lines = describe_doc_split(view.doc_split, spec.eval.split) + describe_strata(view.strata)
        for line in lines:
            print(f"documents: {line}")


def _values(m: Member, n: int, with_mean: bool = False) -> list[str]:
    if m.values is None:
        return ["n/a"] * (n + int(with_mean))
    errors: list[float | None] = list(m.stderr) if m.stderr else [None] * len(m.values)
    cells = [format_score(v, e) for v, e in zip(m.values, errors)]
    return [*cells, format_number(sum(m.values) / len(m.values))] if with_mean else cells


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
        f"study {spec.name}: {s.trial_counts()}{waiting}; {s.cost_line()}; "
        f"Pareto set of {len(s.members)}{knee}; hypervolume (dev) {hv}"
    )


def front_as_dict(
    s: FrontSummary,
    spec: StudySpec,
    doc_split: dict[str, Any] | None = None,
    strata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The front as JSON; `doc_split`: each task's dev/test documents, as the study stored
    them; `strata`: a stratified study's strata."""

    def entry(m: Member) -> dict[str, Any]:
        r = m.record
        return {
            "trial": r.number,
            "label": m.label,
            "knee": m.is_knee,
            "scores": dict(zip(s.objectives, m.values)) if m.values is not None else None,
            # An estimated dev score's standard error (eval.documents: stratified).
            **({"stderr": dict(zip(s.objectives, m.stderr))} if m.stderr is not None else {}),
            "weights": r.weights,
            "tuned": r.tuned,
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
        "storage": shown(spec.storage),
        "split": s.split,
        "documents": doc_split,
        "strata": describe_strata(strata),
        "objectives": [
            {"name": n, "direction": "maximize" if up else "minimize"}
            for n, up in zip(s.objectives, s.maximize)
        ],
        "trials": {
            "total": s.n_trials,
            "complete": s.n_complete,
            "pruned": s.n_pruned,
            "failed": s.n_failed,
            "estimated": s.n_estimated,
        },
        "cost": {"full_trial_equivalents": s.cost, "eval_seconds": s.eval_seconds},
        "hypervolume": s.hypervolume,
        "reference": s.reference,
        "knee": s.knee,
        "front": [entry(m) for m in s.members],
        "baselines": [entry(b) for b in s.baselines],
    }


def render_table(s: FrontSummary, spec: StudySpec, file: Any = None) -> None:
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
    table.add_column("recipe (weights, tuned values)")
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
            format_recipe(m.record),
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
        base.add_column("recipe")
        base.add_column("dominated by (trials of the front)")
        for b in s.baselines:
            by = [str(m.record.number) for m in s.members if b.label in m.dominates]
            base.add_row(
                str(b.record.number),
                b.label,
                *_values(b, len(s.objectives), mean),
                format_recipe(b.record),
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
    console.print(f"{s.trial_counts()}; knee: trial {s.knee}; {s.cost_line()}")
    if s.split != "dev" and any(m.values is None for m in s.members):
        console.print(
            "n/a: not scored on this split yet (`recycler search` re-scores the front when it "
            "finishes)"
        )


def render_csv(s: FrontSummary) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    everyone = [*s.members, *s.baselines]
    estimated = any(m.stderr is not None for m in everyone)
    names = sorted({n for m in everyone for n in m.record.weights})
    tuned = sorted({n for m in everyone for n in m.record.tuned})
    writer.writerow(
        [
            "trial",
            "role",
            "label",
            "knee",
            *s.objectives,
            *(f"se:{n}" for n in s.objectives if estimated),
            *(f"w:{n}" for n in names),
            *(f"p:{n}" for n in tuned),
            "dominates",
        ]
    )
    rows = [("front", m) for m in s.members] + [
        ("baseline", b)
        for b in s.baselines
        if b.record.number not in {m.record.number for m in s.members}
    ]
    for role, m in rows:
        vals = [f"{v:.6g}" for v in m.values] if m.values is not None else [""] * len(s.objectives)
        if estimated:  # the standard errors of an estimated row; empty for an exact one
            vals += [f"{e:.3g}" for e in m.stderr] if m.stderr else [""] * len(s.objectives)
        ws = [_csv_cell(m.record.weights.get(n)) for n in names]
        ps = [_csv_cell(m.record.tuned.get(n)) for n in tuned]
        writer.writerow(
            [m.record.number, role, m.label, int(m.is_knee), *vals, *ws, *ps, ";".join(m.dominates)]
        )
    return buf.getvalue()


def _csv_cell(value: Any) -> str:
    """A weight or tuned value as stored (JSON for one per group); empty when absent."""
    if isinstance(value, dict):
        return json.dumps(value)
    return "" if value is None else f"{value:.6g}"
