"""`recycler search STUDY.yaml [--n-trials N]`: run, or resume, a study with a progress
bar, then re-score its Pareto set on the test split and print a summary line.

When stderr is not a terminal (a log file; a search submitted as a Ray job, watched
with `ray job logs --follow`) a bar redrawn in place says nothing about which trial
finished with what: there a line per finished trial is printed as well."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from recycler.cluster.connect import begin_ray, check_local_gpus, quiet_ray, stop_ray
from recycler.commands._args import positive_int
from recycler.commands.front import summary_line
from recycler.config import StudySpec, load_study_spec
from recycler.search.baselines import GREEDY
from recycler.search.storage import shown
from recycler.search.stored import view_of

if TYPE_CHECKING:
    from recycler.search.budget import Budget
    from recycler.search.prepare import Prepared
    from recycler.search.run import FinishedTrial, SearchProgress

# The search driver (lm-eval's tasks) and the Ray evaluator (PyTorch, the workers' code)
# take seconds to import: they are imported inside the functions that use them, after
# `run_search` has set Ray starting, so that the imports and Ray's start overlap.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", type=Path)
    parser.add_argument("--n-trials", type=positive_int, help="total trials (default: the study's)")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print each start-up phase; show Ray's own notes and stack dumps",
    )


def run(args: argparse.Namespace) -> None:
    if not args.verbose:
        quiet_ray()
    run_search(args.study, args.n_trials, verbose=args.verbose)


def run_search(study_path: Path, n_trials: int | None = None, *, verbose: bool = False) -> None:
    """Search the study to `n_trials` trials (the study file's number by default).

    Ray starts in the background while the study is checked and the pool indexed: the
    two phases take seconds each and need nothing of each other."""
    spec = load_study_spec(study_path)
    console = Console(stderr=True)
    started = time.perf_counter()
    cluster = spec.cluster
    check_local_gpus(cluster.address, cluster.gpus_per_worker, cluster.eval_workers)
    began = begin_ray(cluster.address, cluster.connect_timeout_s)
    prepared: Prepared | None = None
    leaving = False
    try:
        from recycler.search.budget import Budget  # after Ray has begun: see the imports

        with phase(
            console, started, "starting Ray; checking the study, indexing the pool", verbose
        ):
            prepared = prepare_quietly(spec)
        budget = Budget.of(spec, n_trials)
        budget_note = budget.baselines_note(prepared.handle.study)
        for note in [*prepared.notes, *([budget_note] if budget_note else [])]:
            console.print(f"[yellow]note:[/] {note}")
        starting = f"Ray, {cluster.eval_workers} evaluation worker(s), the first trial"
        with phase(console, started, starting, verbose, spinner=False):
            pass  # the progress bar says it until the first trial ends
        search_and_rescore(prepared, budget, console)
    except SystemExit:  # SIGTERM (the `recycler` command raises it)
        leaving = True
        if prepared is not None:
            console.print(f"recycler: stopped: {kept(prepared, study_path)}", soft_wrap=True)
        raise
    finally:
        if began:
            stop_ray(leaving=leaving)  # a no-op once the search's evaluator has stopped it
    print(summary_line(view_of(prepared.handle.study), prepared.spec))


@contextmanager
def phase(
    console: Console, started: float, text: str, verbose: bool, *, spinner: bool = True
) -> Iterator[None]:
    """A start-up phase: with `-v` a line with the seconds since the command began; else on
    a terminal a spinner that leaves nothing behind, so an error line stands alone."""
    if verbose:
        console.print(f"{time.perf_counter() - started:5.1f} s  {text} …", highlight=False)
        yield
    elif spinner and console.is_terminal:
        with console.status(f"{text} …"):
            yield
    else:
        yield


def kept(prepared: Prepared, study_path: Path) -> str:
    """What a stopped search leaves: the trials stored, and how to go on."""
    study = prepared.handle.study
    finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    return (
        f"{finished} finished trial(s) of study {prepared.spec.name!r} are stored in "
        f"{shown(prepared.spec.storage)}; `recycler search {study_path}` resumes it"
    )


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Building tasks logs lm-eval's defaults and draws datasets' bars: not news to a user."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def prepare_quietly(spec: StudySpec) -> Prepared:
    """`prepare`, with what lm-eval and Optuna log along the way kept off the terminal."""
    # Optuna logs every trial at INFO; the progress bar and `recycler front` say it better.
    from recycler.search.prepare import prepare  # see the imports

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with quiet_lm_eval():
        return prepare(spec)


def trial_line(t: FinishedTrial) -> str:
    """`trial 7 [search] complete: quality=0.8125 cost=1.25 · merge 0.02 s · eval 1.31 s`;
    `trial 8 [search] pruned at rung 0.11: …` for a multi-fidelity trial stopped early."""
    label = "greedy step" if t.baseline == GREEDY else t.baseline or "search"
    head = f"trial {t.number} [{label}]"
    if t.values is None:
        lines = (t.failure or "").strip().splitlines()
        text = f"{head} failed: {lines[0] if lines else 'no reason given'}"
    else:
        scores = " ".join(f"{name}={value:.6g}" for name, value in t.values.items())
        cached = f" (scores of trial {t.cache_hit}, same recipe)" if t.cache_hit is not None else ""
        outcome = (
            "complete"
            if t.pruned_at_fraction is None
            else f"pruned at rung {t.pruned_at_fraction:g}"
        )
        text = f"{head} {outcome}{cached}: {scores}"
    if t.merge_seconds is not None:
        text += f" · merge {t.merge_seconds:.2f} s"
    if t.eval_seconds is not None:
        text += f" · eval {t.eval_seconds:.2f} s"
    return text


def trial_printer(console: Console) -> Callable[[FinishedTrial], None] | None:
    """A line per finished trial on `console` when it is not a terminal; None on a
    terminal, where the progress bar says it."""
    if console.is_terminal:
        return None

    def print_trial(t: FinishedTrial) -> None:
        console.print(trial_line(t), markup=False, highlight=False, soft_wrap=True)

    return print_trial


def search_and_rescore(prepared: Prepared, budget: Budget, console: Console) -> None:
    """Run the search to its budget with a progress bar, then re-score the front on test.

    The bar counts trials, or with `search.budget` the cost in full-trial equivalents;
    both are shown either way."""
    from recycler.cluster.evaluator import RayEvaluator  # see the imports
    from recycler.search.run import SearchDriver

    spec = prepared.spec
    by_cost = budget.cost is not None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]} · HV {task.fields[hv]} · {task.fields[spe]} s/eval"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        total = budget.cost if by_cost else budget.n_trials
        # Until a trial ends: what the search waits for (Ray, its workers, the first trial).
        task_id = progress.add_task(
            f"study {spec.name}: starting workers", total=total, count="", hv="-", spe="-"
        )

        def on_progress(p: SearchProgress) -> None:
            if by_cost:
                count = f"{p.cost:.2f}/{p.budget.cost:g} full-trial cost · {p.done} trials"
            else:
                count = f"{p.done}/{p.budget.n_trials} trials · cost {p.cost:.2f} full trials"
            progress.update(
                task_id,
                description=f"study {spec.name}",
                completed=min(p.cost if by_cost else p.done, total or 0),
                count=count,
                hv="-" if p.hypervolume is None else f"{p.hypervolume:.4g}",
                spe="-" if p.seconds_per_eval is None else f"{p.seconds_per_eval:.1f}",
            )

        with SearchDriver(
            prepared,
            lambda: RayEvaluator.from_spec(spec, prepared.pool, prepared.suite),
            capacity=spec.cluster.eval_workers,
            on_progress=on_progress,
            on_trial=trial_printer(console),
        ) as driver:
            driver.preflight(budget)  # one document per task first: a failing config fails here
            driver.run(budget)
            if driver.stop_reason is not None:
                console.print(f"note: {driver.stop_reason}")
            if driver.stale:
                console.print(
                    "note: failed and re-ran trial(s) left running by a killed process: "
                    f"{driver.stale}"
                )
            progress.update(task_id, description=f"study {spec.name}: test split")
            driver.rescore_front()
