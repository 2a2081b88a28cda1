"""`recycler export STUDY.yaml OUT_DIR [--trial N | --pick knee | --pick best:NAME]`:
one trial's merge as a Hugging Face model directory.

The trial's stored recipe is merged again, streamed from disk by the merge engine's
writer (the search merged it in memory; the bytes are the same), and the model card
carries the trial's scores on dev and, for the Pareto set, on test.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recycler.commands._args import force_hint
from recycler.config import StudySpec, load_study_spec
from recycler.errors import RecyclerError
from recycler.export.model_dir import write_model_dir
from recycler.merge.recipe import Recipe
from recycler.pool import Pool
from recycler.search.analysis import FrontSummary, analyse
from recycler.search.stored import StudyView, TrialRecord
from recycler.search.study import load_view


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", type=Path)
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--trial", type=int, default=None, help="trial number")
    group.add_argument("--pick", default=None, help="knee | best:OBJECTIVE (default: knee)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> None:
    with force_hint():
        export_trial(args.study, args.out_dir, trial=args.trial, pick=args.pick, force=args.force)


def choose_trial(
    view: StudyView, summary: FrontSummary, trial: int | None, pick: str | None
) -> tuple[TrialRecord, str]:
    """(record, how it was chosen) for --trial N, --pick knee (default) or --pick best:NAME."""
    by_number = {r.number: r for r in view.trials}
    if trial is not None:
        record = by_number.get(trial)
        if record is None:
            raise RecyclerError(
                f"--trial: study {view.name!r} has no trial {trial} (trials "
                f"0..{len(view.trials) - 1})"
            )
        if record.state != "COMPLETE" or record.recipe is None:
            why = f": {record.fail_reason}" if record.fail_reason else ""
            raise RecyclerError(
                f"--trial: trial {trial} is {record.state.lower()}{why}; only completed trials can "
                "be exported"
            )
        return record, f"trial {trial}"
    pick = pick or "knee"
    if not summary.members:
        raise RecyclerError(f"study {view.name!r} has no completed trial yet; run recycler search")
    if pick == "knee":
        assert summary.knee is not None
        return by_number[summary.knee], "knee of the Pareto set"
    if pick.startswith("best:"):
        name = pick.removeprefix("best:")
        if name not in summary.objectives:
            raise RecyclerError(
                f"--pick: no objective {name!r} (objectives: {', '.join(summary.objectives)})"
            )
        number = summary.best(name)
        assert number is not None
        return by_number[number], f"best on {name}"
    raise RecyclerError(f"--pick: must be knee or best:OBJECTIVE, got {pick!r}")


def card_extra(
    spec: StudySpec, record: TrialRecord, how: str, summary: FrontSummary
) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "study": spec.name,
        "trial": record.number,
        "chosen as": how,
        "on the Pareto set": any(m.record.number == record.number for m in summary.members),
    }
    if record.baseline:
        extra["baseline"] = record.baseline
    if record.tuned:
        # what the search chose beside the weights (also in the recipe above)
        extra["tuned values"] = dict(record.tuned)
    extra[f"scores on {spec.eval.split}"] = dict(record.objectives)
    if record.test_objectives:
        extra["scores on test"] = dict(record.test_objectives)
    for task, metrics in sorted(record.metrics.items()):
        extra[f"lm-eval {task} ({spec.eval.split})"] = {
            k: v for k, v in metrics.items() if isinstance(v, int | float)
        }
    return extra


def export_trial(
    study_path: Path,
    out_dir: Path,
    trial: int | None = None,
    pick: str | None = None,
    force: bool = False,
) -> Path:
    """Merge the chosen trial's recipe again into `out_dir`, its scores in the model card."""
    spec = load_study_spec(study_path)
    view = load_view(spec)
    summary = analyse(view, "dev")
    record, how = choose_trial(view, summary, trial, pick)
    assert record.recipe is not None
    pool = Pool.open(spec.pool.checkpoints, spec.base_path, root=spec.root)
    recipe = Recipe.from_dict(record.recipe, where=f"trial {record.number}'s recipe")
    stored = [str(Path(m.model)) for m in recipe.models]
    current = [str(c.path) for c in pool.checkpoints]
    if stored != current:
        raise RecyclerError(
            f"trial {record.number}: its recipe names checkpoints that are not the pool's now "
            f"({', '.join(stored)}); the study file's pool changed since the search"
        )
    written = write_model_dir(
        out_dir, pool, recipe, force=force, card_extra=card_extra(spec, record, how, summary)
    )
    scores = ", ".join(f"{k}={v:.4g}" for k, v in record.objectives.items())
    print(f"exported trial {record.number} ({how}; {scores}) to {written}")
    return written
