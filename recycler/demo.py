"""`recycler demo`: demo pool → search → front → export → report, in one command.

Builds the demo pool (or reuses one already built in the work folder), runs the study
file the zoo wrote beside it, prints the Pareto set against the single checkpoints and
the baselines (dev and test), exports the knee trial, writes the report and says how
to open the dashboard. Re-running it resumes the same study: a finished demo costs
seconds the second time.
"""

from __future__ import annotations

import time
from pathlib import Path

from recycler.errors import RecyclerError


def run_demo(workdir: Path, n_trials: int | None = None, size: str = "small") -> None:
    from rich.console import Console

    from recycler.config import load_study_spec
    from recycler.report import write_report_for
    from recycler.search.analysis import analyse
    from recycler.search.pick import export_trial
    from recycler.search.run import prepare, search_and_rescore
    from recycler.search.show import render_table, summary_line
    from recycler.search.study import view_of

    if size not in ("micro", "small"):
        raise RecyclerError(f"--size: must be micro or small, got {size!r}")
    if n_trials is not None and n_trials < 1:
        raise RecyclerError(f"--n-trials: must be at least 1, got {n_trials}")
    console = Console(stderr=True)
    started = time.perf_counter()
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise RecyclerError(f"--workdir: {workdir} exists and is not a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    zoo = workdir / f"zoo-{size}"
    from recycler.zoo.build import build_zoo

    # build_zoo reuses a complete pool of this size and trains one otherwise.
    console.print(
        f"[1/5] demo pool: the {size} pool in {zoo} (trained on the first run, then reused)"
    )
    build_started = time.perf_counter()
    build_zoo(zoo, size=size, seed=0)
    console.print(f"      ready after {time.perf_counter() - build_started:.0f} s")
    study_path = zoo / "study.yaml"
    spec = load_study_spec(study_path)
    target = n_trials if n_trials is not None else spec.search.n_trials
    console.print(
        f"[2/5] search: study {spec.name!r}, {target} trials, sampler {spec.search.sampler}, "
        f"objectives {', '.join(spec.objective_names)}"
    )
    prepared = prepare(spec)
    for note in prepared.notes:
        console.print(f"note: {note}")
    search_and_rescore(prepared, target, console)
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
    write_report_for(spec, view, workdir / "report")
    elapsed = time.perf_counter() - started
    print(f"\ndemo done in {elapsed:.0f} s. Next:")
    print(f"  recycler dashboard {study_path}        # optuna-dashboard on http://127.0.0.1:8080/")
    print(f"  recycler front {study_path}                # the same on dev, or --format csv|json")
    print(f"  open {workdir / 'report' / 'index.html'}")
