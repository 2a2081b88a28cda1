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
import math
from typing import Any

from lm_eval.evaluator import evaluate

from recycler.errors import RecyclerError
from recycler.evaluate.model import ResidentModel
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
    if limit is not None and limit <= 0:
        raise RecyclerError(f"eval.limit: must be positive, got {limit}")
    suite = load_suite(request)
    samples = suite.use_split(split, limit)
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
            log_samples=False,
            apply_chat_template=request.apply_chat_template,
            fewshot_as_multiturn=request.fewshot_as_multiturn,
        )
    if out is None:  # only non-zero ranks get None; recycler runs one rank
        raise RuntimeError("lm-eval returned no results")
    return parse_results(out["results"])


def parse_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's `results` block -> task -> metric -> float (stderrs, aliases and N/A dropped)."""
    parsed: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        values: dict[str, float] = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, (str, bool)):
                continue
            if not isinstance(value, (int, float)) or math.isnan(value):
                continue
            values[metric if filt == "none" else key] = float(value)
        parsed[task] = values
    return parsed
