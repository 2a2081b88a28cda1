"""A study made ready to search: its tasks checked and their documents split, the pool
indexed, the search space built, the study opened (or created, its baselines enqueued).

Everything here runs before a cluster starts, so a study file that cannot work fails
in seconds, naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recycler.config import StudySpec
from recycler.errors import RecyclerError
from recycler.evaluate import docsplit
from recycler.evaluate.strata import TaskPlan
from recycler.evaluate.tasks import (
    SuiteRequest,
    UnknownTaskError,
    load_suite,
    metric_info,
    suite_request,
)
from recycler.pool import Pool
from recycler.samplers import SAMPLERS
from recycler.search.baselines import baseline_trials, is_checkpoint_baseline
from recycler.search.fidelity import RungPlan
from recycler.search.space import SearchSpace
from recycler.search.stored import (
    Objective,
    baselines_enqueued,
    mark_baselines_enqueued,
    queued_attrs,
    view_of,
    write_dev_docs,
)
from recycler.search.study import StudyHandle, enqueue, open_study, resolve_objectives


@dataclass
class Prepared:
    """A study ready to run: the pool indexed, the space built, the study opened."""

    spec: StudySpec
    pool: Pool
    space: SearchSpace
    objectives: list[Objective]
    handle: StudyHandle
    notes: list[str]
    rungs: RungPlan  # which documents a trial scores, rung by rung (one rung: all of dev)
    suite: SuiteRequest  # the tasks scored (what per-document scores are combined by)
    # eval.documents: stratified: which tasks are stratified, on which metrics; else None.
    task_plan: TaskPlan | None = None


def study_fingerprint(
    spec: StudySpec, space: SearchSpace, rungs: RungPlan, dev_data: str | None = None
) -> dict[str, Any]:
    """The parts of the study file a resumed study must share with the stored one;
    `dev_data`: a stratified study's digest of its dev documents (its strata are built
    from the checkpoints' scores on them)."""
    stratified = spec.eval.documents == "stratified"
    return {
        **space.fingerprint(),
        "split": spec.eval.split,
        "limit": spec.eval.limit,
        # None without search.fidelity: what a study made before the key existed reads as.
        "fidelity": rungs.record(),
        # None: every document (what a study made before the key existed reads as).
        "documents": (
            {
                "stratified": spec.eval.agreed_sample,
                "sampled_dissent": spec.eval.sampled_dissent,
                "dev_data_sha256": dev_data,
            }
            if stratified
            else None
        ),
    }


def task_plan(spec: StudySpec, request: SuiteRequest) -> tuple[TaskPlan, str]:
    """A stratified study's `TaskPlan`, and a digest of every dev document it scores (a
    resume with other data is refused: its strata would describe other documents)."""
    suite = load_suite(request)
    dev_ids = suite.doc_ids(spec.eval.split, spec.eval.limit)
    suite.use_split(spec.eval.split, spec.eval.limit)
    digest = docsplit.docs_digest(
        [task, docsplit.docs_digest(suite.leaves[task].eval_docs[i] for i in ids)]
        for task, ids in sorted(dev_ids.items())
    )
    plan = TaskPlan.of(suite, [(o.task, o.metric) for o in spec.objectives], dev_ids)
    return plan, digest


def objective_directions(
    spec: StudySpec, request: SuiteRequest
) -> tuple[Callable[[str, str], bool | None], dict[str, dict[str, Any]], RungPlan]:
    """lm-eval's higher_is_better for (task, metric), after checking every objective exists,
    each task's dev/test documents (`TaskSuite.split_records`), and the rungs' documents.

    Builds the task suite of `request` (lm-eval indexes the folders and loads the data),
    so a misspelt task, metric or filter, a missing local dataset or a split too small
    fails here, before a cluster starts.
    """
    try:
        info = metric_info(request)
        suite = load_suite(request)
        records = suite.split_records()
        dev_ids = suite.doc_ids(spec.eval.split, spec.eval.limit)
    except UnknownTaskError as exc:
        i = next(i for i, o in enumerate(spec.objectives) if o.task == exc.name)
        raise RecyclerError(f"objectives.{i}.task: {exc}") from None
    except RecyclerError as exc:
        raise RecyclerError(
            f"objectives: {exc}" if not str(exc).startswith("eval.") else str(exc)
        ) from None
    for i, o in enumerate(spec.objectives):
        known = info[o.task]
        metric, _, filt = o.metric.partition(",")
        if o.metric not in known.directions and metric not in known.directions:
            raise RecyclerError(
                f"objectives.{i}.metric: task {o.task} has no metric {metric!r} "
                f"(it has: {', '.join(sorted(known.directions)) or 'none'})"
            )
        if filt and filt not in known.filters:
            raise RecyclerError(
                f"objectives.{i}.metric: task {o.task} has no filter {filt!r} "
                f"(it has: {', '.join(known.filters)})"
            )

    def lookup(task: str, metric: str) -> bool | None:
        known = info[task].directions
        return known.get(metric, known.get(metric.split(",", 1)[0]))

    rungs = RungPlan.build(dev_ids, spec.search.fidelity, spec.eval.split_seed)
    return lookup, records, rungs


def prepare(spec: StudySpec, *, create: bool = True) -> Prepared:
    """Index the pool (headers only), build the space, open or create the study, enqueue
    the baselines. An error about a key of the study file names the file, as its own
    checks do."""
    try:
        return _prepare(spec, create)
    except RecyclerError as exc:
        raise RecyclerError(spec.keyed(str(exc))) from None


def _prepare(spec: StudySpec, create: bool) -> Prepared:
    pool = Pool.open(spec.pool.checkpoints, spec.base_path, root=spec.root)
    space = SearchSpace.from_pool(spec, pool)
    request = suite_request(spec)
    directions, doc_split, rungs = objective_directions(spec, request)
    objectives = resolve_objectives(spec, directions)
    plan, dev_data = (
        task_plan(spec, request) if spec.eval.documents == "stratified" else (None, None)
    )
    handle = open_study(
        spec,
        study_fingerprint(spec, space, rungs, dev_data),
        objectives,
        create=create,
        doc_split=doc_split,
    )
    notes: list[str] = [] if plan is None else plan.summary()
    study = handle.study
    if create and not baselines_enqueued(study.user_attrs):
        baselines, skipped = baseline_trials(
            space, pool.checkpoints, spec.search.enqueued_baselines
        )
        notes.extend(skipped)
        for label, params in baselines:
            # skip_if_exists: a start killed while enqueuing re-enqueues only what is missing.
            enqueue(study, params, queued_attrs(params, baseline=label), skip_if_exists=True)
        mark_baselines_enqueued(study)
    if plan is not None and not any(
        is_checkpoint_baseline(label)
        for label, _ in baseline_trials(space, pool.checkpoints, spec.search.enqueued_baselines)[0]
    ):
        raise RecyclerError(
            f"eval.documents: stratified needs the checkpoints scored alone (singles), and "
            f"merge.method {spec.merge.method} has no such baseline"
        )
    notes.extend(rungs.notes)
    if spec.search.fidelity is not None and SAMPLERS[spec.search.sampler].ignores_pruned:
        notes.append(
            f"search.fidelity with sampler {spec.search.sampler}: it learns from complete "
            "trials only, a few of a multi-fidelity search's; tpe learns from pruned ones too"
        )
    if create and view_of(study).dev_docs != rungs.full_docs:
        write_dev_docs(study, rungs.full_docs)
    return Prepared(spec, pool, space, objectives, handle, notes, rungs, request, plan)
