"""A study as an HTML page and PNGs.

- pareto.png: every completed trial, the Pareto set, the knee, the single checkpoints
  and the other baselines (one panel per pair of objectives);
- hypervolume.png: the hypervolume of the first k trials against k (best macro-average
  for a single objective), one fixed reference point so the curve only rises;
- weights.png: the weights of the Pareto set's members by checkpoint (where the method
  reads weights; the tables show every member's and baseline's full recipe).

Matplotlib's object API (Figure, no pyplot) keeps this free of global backend state.
Files are written under temporary names and renamed, so a failed run leaves no half
written report.
"""

from __future__ import annotations

import html
import os
import shutil
from itertools import combinations
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.export.model_dir import check_out_dir, move_into_place
from recycler.search import front as pareto
from recycler.search.analysis import (
    FrontSummary,
    analyse,
    describe_doc_split,
    describe_strata,
    format_recipe,
    format_score,
)
from recycler.search.baselines import SINGLE
from recycler.search.storage import shown
from recycler.search.stored import StudyView


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_front(view: StudyView, s: FrontSummary, path: Path) -> None:
    names = s.objectives
    pairs = list(combinations(range(len(names)), 2)) or [(0, 0)]
    # One panel per pair of objectives, three panels to a row.
    cols = min(3, len(pairs))
    rows = (len(pairs) + cols - 1) // cols
    fig = Figure(figsize=(5.5 * cols, 4.6 * rows), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [grid[k // cols][k % cols] for k in range(len(pairs))]
    for k in range(len(pairs), rows * cols):
        grid[k // cols][k % cols].set_visible(False)
    complete = view.complete
    front_numbers = {m.record.number for m in s.members}
    for ax, (i, j) in zip(axes, pairs):

        def xy(r: Any, i: int = i, j: int = j) -> tuple[float, float]:
            v = r.vector_dev
            return (float(r.number), v[i]) if i == j else (v[i], v[j])

        others = [xy(r) for r in complete if r.number not in front_numbers and not r.baseline]
        if others:
            ax.scatter(*zip(*others), s=14, c="0.7", label="search trials")
        front_pts = sorted(xy(m.record) for m in s.members)
        if front_pts:
            ax.scatter(*zip(*front_pts), s=40, c="tab:blue", label="Pareto set", zorder=3)
        singles = [
            b for b in s.baselines if b.record.baseline and b.record.baseline.startswith(SINGLE)
        ]
        for b in singles:
            x, y = xy(b.record)
            ax.scatter(
                [x],
                [y],
                marker="s",
                s=46,
                c="tab:orange",
                zorder=4,
                label="single checkpoints" if b is singles[0] else None,
            )
            ax.annotate(
                b.record.baseline[len(SINGLE) :] if b.record.baseline else "",
                (x, y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        markers = ["^", "v", "D", "P", "X", "*"]
        for k, b in enumerate(b for b in s.baselines if b not in singles):
            x, y = xy(b.record)
            ax.scatter([x], [y], marker=markers[k % len(markers)], s=60, zorder=4, label=b.label)
        if s.knee is not None:
            knee = next(m.record for m in s.members if m.record.number == s.knee)
            ax.scatter(
                *xy(knee),
                marker="*",
                s=260,
                facecolors="none",
                edgecolors="red",
                linewidths=1.5,
                zorder=5,
                label=f"knee (trial {s.knee})",
            )
        arrow = ["↑" if up else "↓" for up in s.maximize]
        if i == j:
            ax.set_xlabel("trial")
            ax.set_ylabel(f"{names[i]} {arrow[i]} (dev)")
        else:
            ax.set_xlabel(f"{names[i]} {arrow[i]} (dev)")
            ax.set_ylabel(f"{names[j]} {arrow[j]} (dev)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"study {view.name}: Pareto set on dev")
    _save(fig, path)


def plot_hypervolume(view: StudyView, s: FrontSummary, path: Path) -> None:
    complete = sorted(view.complete, key=lambda r: r.number)
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    if complete:
        vectors = [r.vector_dev for r in complete if r.vector_dev is not None]
        numbers = [r.number for r in complete]
        if len(s.objectives) > 1:
            ax.plot(
                numbers, pareto.hypervolume_history(vectors, s.maximize), drawstyle="steps-post"
            )
            ax.set_ylabel("hypervolume (dev)")
        else:
            sign = 1.0 if s.maximize[0] else -1.0
            best, curve = None, []
            for v in vectors:
                best = v[0] if best is None or sign * v[0] > sign * best else best
                curve.append(best)
            ax.plot(numbers, curve, drawstyle="steps-post")
            ax.set_ylabel(f"best {s.objectives[0]} (dev)")
    ax.set_xlabel("trial")
    ax.grid(alpha=0.3)
    ax.set_title(
        "hypervolume of the trials so far (reference: the worst of each objective)", fontsize=9
    )
    _save(fig, path)


def _flat_weights(weights: dict[str, Any]) -> dict[str, float]:
    """Per-checkpoint weight; grouped weights are averaged over their groups."""
    out = {}
    for name, w in weights.items():
        if isinstance(w, dict):
            vals = [float(v) for v in w.values() if isinstance(v, int | float)]
            out[name] = sum(vals) / len(vals) if vals else 0.0
        elif isinstance(w, int | float):
            out[name] = float(w)
    return out


def plot_weights(s: FrontSummary, path: Path) -> None:
    members = s.members
    names = sorted({n for m in members for n in m.record.weights})
    grouped = any(isinstance(w, dict) for m in members for w in m.record.weights.values())
    fig = Figure(figsize=(7, 1.0 + 0.4 * max(1, len(members))))
    ax = fig.subplots()
    lefts = [0.0] * len(members)
    labels = [f"trial {m.record.number}" + (" (knee)" if m.is_knee else "") for m in members]
    cmap = [f"C{k % 10}" for k in range(len(names))]
    for k, name in enumerate(names):
        widths = [_flat_weights(m.record.weights).get(name, 0.0) for m in members]
        ax.barh(labels, widths, left=lefts, color=cmap[k], label=name)
        lefts = [a + b for a, b in zip(lefts, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("weight" + (" (mean over groups)" if grouped else ""))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title("weights of the Pareto set's members", fontsize=9)
    _save(fig, path)


def _html_table(s: FrontSummary, rows: list[Any], test: FrontSummary, front: bool) -> str:
    """Front members (what they dominate) or baselines (what dominates them), each with its
    recipe: weights and tuned values."""
    test_vals = {m.record.number: m.values for m in [*test.members, *test.baselines]}
    head = "".join(
        f"<th>{html.escape(n)} (dev)</th><th>{html.escape(n)} (test)</th>" for n in s.objectives
    )
    last = "dominates (dev)" if front else "dominated by (dev)"
    out = [
        f"<table><tr><th>trial</th><th>label</th>{head}<th>recipe (weights, tuned values)</th>"
        f"<th>{last}</th></tr>"
    ]
    for m in rows:
        tv = test_vals.get(m.record.number)
        cells = "".join(
            (
                f"<td>{format_score(m.values[k], m.stderr[k] if m.stderr else None)}</td>"
                if m.values
                else "<td>n/a</td>"
            )
            + (f"<td>{tv[k]:.4f}</td>" if tv else "<td>n/a</td>")
            for k in range(len(s.objectives))
        )
        label = html.escape(m.label + (" (knee)" if m.is_knee else ""))
        recipe = f"<td><code>{html.escape(format_recipe(m.record))}</code></td>"
        related = (
            m.dominates
            if front
            else [f"trial {f.record.number}" for f in s.members if m.label in f.dominates]
        )
        out.append(
            f"<tr><td>{m.record.number}</td><td>{label}</td>{cells}{recipe}"
            f"<td>{html.escape(', '.join(related) or '-')}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def write_report(spec: StudySpec, view: StudyView, out_dir: Path, *, force: bool = False) -> Path:
    """index.html + pareto.png, hypervolume.png, weights.png in `out_dir`; the page's path.
    A non-empty `out_dir` is replaced only when `force`; the report is written beside it
    first, so a failure leaves it as it was."""
    summary = analyse(view, "dev")
    if not summary.members:
        raise RecyclerError(f"study {spec.name!r} has no completed trial yet; run recycler search")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.recycler-report-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_pages(spec, view, summary, tmp)
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"


def _write_pages(spec: StudySpec, view: StudyView, summary: FrontSummary, out_dir: Path) -> None:
    test = analyse(view, "test")
    plot_front(view, summary, out_dir / "pareto.png")
    plot_hypervolume(view, summary, out_dir / "hypervolume.png")
    weighted = any(m.record.weights for m in summary.members)
    if weighted:
        plot_weights(summary, out_dir / "weights.png")
    weights_section = (
        '<h2>Weights</h2><img src="weights.png" alt="weights of the Pareto set">'
        if weighted
        else "<p>The method reads no weights: the recipe columns above show what it tuned.</p>"
    )
    hv = "n/a" if summary.hypervolume is None else f"{summary.hypervolume:.6g}"
    hv_test = "n/a" if test.hypervolume is None else f"{test.hypervolume:.6g}"
    directions = ", ".join(
        f"{n} ({'max' if up else 'min'})" for n, up in zip(summary.objectives, summary.maximize)
    )
    documents = "".join(
        f"<li>{html.escape(line)}</li>"
        for line in describe_doc_split(view.doc_split, spec.eval.split)
        + describe_strata(view.strata)
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>recycler study {html.escape(spec.name)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}
table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}img{{max-width:100%}}</style></head>
<body>
<h1>Study {html.escape(spec.name)}</h1>
<p>{summary.trial_counts()}; {summary.cost_line()};
Pareto set of {len(summary.members)} chosen on {html.escape(spec.eval.split)};
knee: trial {summary.knee}.
Hypervolume: {hv} on dev, {hv_test} on test for the Pareto set. Objectives:
{html.escape(directions)}.
Storage: <code>{html.escape(shown(spec.storage))}</code>,
method <code>{html.escape(spec.merge.method)}</code>,
sampler <code>{html.escape(spec.search.sampler)}</code>.</p>
<p>Documents each score used:</p><ul>{documents}</ul>
<h2>Pareto set</h2>
{_html_table(summary, summary.members, test, True)}
<h2>Baselines</h2>
{_html_table(summary, summary.baselines, test, False)}
<h2>Pareto front</h2><img src="pareto.png" alt="Pareto front">
<h2>Hypervolume</h2><img src="hypervolume.png" alt="hypervolume against trials">
{weights_section}
</body></html>
"""
    (out_dir / "index.html").write_text(page, encoding="utf-8")
