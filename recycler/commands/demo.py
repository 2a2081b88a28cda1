"""`recycler demo`: demo pool → search → front → export → report, in one command.

Builds the demo pool (or reuses one already built in the work folder), runs the study
file the zoo wrote beside it, prints the Pareto set against the single checkpoints and
the baselines (dev and test), exports the knee trial, writes the report and says how
to open the dashboard. Re-running it resumes the same study: a finished demo costs
seconds the second time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from recycler.cluster.connect import quiet_ray
from recycler.commands._args import positive_int
from recycler.commands.export import export_trial
from recycler.commands.front import render_table, summary_line
from recycler.commands.search import prepare_quietly, search_and_rescore
from recycler.config import load_study_spec
from recycler.errors import RecyclerError
from recycler.report import write_report
from recycler.search.analysis import analyse
from recycler.search.budget import Budget
from recycler.search.stored import view_of
from recycler.zoo.build import build_zoo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo", type=Path)
    parser.add_argument("--n-trials", type=positive_int, default=None)
    parser.add_argument("--size", choices=["micro", "small"], default="small")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show Ray's own log lines"
    )


def run(args: argparse.Namespace) -> None:
    if not args.verbose:  # as `recycler search` does
        quiet_ray()
    run_demo(args.workdir, n_trials=args.n_trials, size=args.size)


def run_demo(workdir: Path, n_trials: int | None = None, size: str = "small") -> None:
    console = Console(stderr=True)
    started = time.perf_counter()
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise RecyclerError(f"--workdir: {workdir} exists and is not a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    zoo = workdir / f"zoo-{size}"
    # build_zoo reuses a complete pool of this size and trains one otherwise.
    console.print(
        f"[1/5] demo pool: the {size} pool in {zoo} (trained on the first run, then reused)"
    )
    build_started = time.perf_counter()
    build_zoo(zoo, size=size, seed=0)
    console.print(f"      ready after {time.perf_counter() - build_started:.0f} s")
    study_path = zoo / "study.yaml"
    spec = load_study_spec(study_path)
    budget = Budget.of(spec, n_trials)
    size_of = (
        f"{budget.n_trials} trials"
        if budget.cost is None
        else f"{budget.cost:g} full-trial equivalents"
    )
    console.print(
        f"[2/5] search: study {spec.name!r}, {size_of}, sampler {spec.search.sampler}, "
        f"objectives {', '.join(spec.objective_names)}"
    )
    prepared = prepare_quietly(spec)
    for note in prepared.notes:
        console.print(f"note: {note}")
    search_and_rescore(prepared, budget, console)
    view = view_of(prepared.handle.study)
    console.print(
        "[3/5] the Pareto set (chosen on dev) against the single checkpoints and baselines, "
        "on the held-out test split"
    )
    render_table(analyse(view, "test"), spec)
    print(summary_line(view, spec))
    console.print("[4/5] export: the knee trial")
    export_trial(study_path, workdir / "knee-model", pick="knee", force=True)
    console.print("[5/5] report")
    print(f"report written to {write_report(spec, view, workdir / 'report', force=True)}")
    elapsed = time.perf_counter() - started
    print(f"\ndemo done in {elapsed:.0f} s. Next:")
    print(f"  recycler dashboard {study_path}        # optuna-dashboard on http://127.0.0.1:8080/")
    print(f"  recycler front {study_path}                # the same on dev, or --format csv|json")
    print(f"  open {workdir / 'report' / 'index.html'}")
