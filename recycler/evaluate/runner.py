"""Score the resident model with lm-eval on a split of a task suite.

The model goes to lm-eval as an object (its HF wrapper), the tasks as cached
objects, so one evaluation costs only the forward passes and lm-eval's
bookkeeping. This calls lm-eval's `evaluate` (what `simple_evaluate` calls
after building the model and tasks) because `simple_evaluate` also collects
environment information by running `pip list` in a subprocess, about a second
per call, which would dominate a small trial. Stderr bootstraps are skipped
(bootstrap_iters=0): a search wants the point estimate.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

from lm_eval.evaluator import evaluate

from recycler.errors import RecyclerError
from recycler.evaluate.model import ResidentModel
from recycler.evaluate.results import DocScores, doc_scores_of, parse_results
from recycler.evaluate.tasks import SuiteRequest, load_suite


def evaluate_tasks(
    rm: ResidentModel,
    request: SuiteRequest,
    split: str,
    *,
    limit: int | None = None,
    batch_size: int | str = 32,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """task (and group) name -> metric -> value, for the request's tasks scored on `split`.

    `split` is the dev split's name or "test": each task's named split of that name, or
    that part of its derived dev/test split (`TaskSuite.use_split`).

    Metric keys are lm-eval's without the filter suffix when the filter is
    "none" ("acc,none" -> "acc"); other filters keep it ("exact_match,strict").
    Every task inside a named group is reported as well as the group.
    `progress` shows lm-eval's progress bars (off: a search runs this per trial).
    """
    out = _run(rm, request, split, limit=limit, batch_size=batch_size, progress=progress)
    return parse_results(out["results"])


def score_documents(
    rm: ResidentModel,
    request: SuiteRequest,
    split: str,
    docs: Mapping[str, Sequence[int]],
    *,
    batch_size: int | str = 32,
) -> DocScores:
    """Each document's scores, for the given documents of every leaf task on `split` (ids
    from `TaskSuite.doc_ids`; `doc_scores.aggregate` turns them into metrics)."""
    empty = sorted(task for task, ids in docs.items() if not ids)
    if empty:  # lm-eval reads an empty list as "every document"
        raise RecyclerError(f"no documents to score for task {empty[0]}")
    samples = {task: sorted(ids) for task, ids in docs.items()}
    out = _run(rm, request, split, samples=samples, batch_size=batch_size, log_samples=True)
    return doc_scores_of(out["samples"])


def _run(
    rm: ResidentModel,
    request: SuiteRequest,
    split: str,
    *,
    limit: int | None = None,
    samples: dict[str, list[int]] | None = None,
    batch_size: int | str = 32,
    progress: bool = False,
    log_samples: bool = False,
) -> Any:
    """lm-eval's `evaluate` on `split` (`samples`: these documents of it, else `limit`)."""
    if limit is not None and limit <= 0:
        raise RecyclerError(f"eval.limit: must be positive, got {limit}")
    suite = load_suite(request)
    chosen = suite.use_split(split, limit)
    if samples is None:
        samples = chosen
    # tqdm draws its bars on the sys.stderr of the moment; lm-eval's log
    # messages go through logging handlers and are not affected.
    quiet: contextlib.AbstractContextManager[Any] = (
        contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    )
    with quiet:
        out = evaluate(
            lm=rm.lm(batch_size),
            task_dict=suite.task_dict,
            limit=limit if samples is None else None,
            samples=samples,
            bootstrap_iters=0,
            log_samples=log_samples,
            apply_chat_template=request.apply_chat_template,
            fewshot_as_multiturn=request.fewshot_as_multiturn,
        )
    if out is None:  # only non-zero ranks get None; recycler runs one rank
        raise RuntimeError("lm-eval returned no results")
    return out
