"""Stratified evaluation (`eval.documents: stratified`): strata from the checkpoints' own
per-document scores, estimates and their standard errors, the driver's passes, cost,
what the front shows, and resumes and study files it refuses.

The strata and the estimates are built from real lm-eval scores of the micro pool's
checkpoints; the driver tests score toy documents (each document's value computed from
the recipe's weights) so that each decision can be checked by hand; the end-to-end test
runs real lm-eval on a real local Ray.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from test_search_front import weights_of

from recycler.cli import main
from recycler.config import load_study_spec
from recycler.errors import RecyclerError
from recycler.evaluate import doc_scores
from recycler.evaluate.evaluator import EvalResult
from recycler.evaluate.model import ResidentModel
from recycler.evaluate.results import IDS, DocScores
from recycler.evaluate.runner import score_documents
from recycler.evaluate.strata import CONTESTED, MIN_AGREED_SAMPLE, Strata, TaskPlan
from recycler.evaluate.tasks import folder_request, load_suite
from recycler.merge.recipe import Recipe
from recycler.search.budget import cost_of
from recycler.search.prepare import prepare
from recycler.search.run import SearchDriver
from recycler.search.stored import TrialKey, view_of
from recycler.zoo.checkpoints import read_full
from recycler.zoo.skills import SKILLS
from recycler.zoo.tasks import task_name

TASKS = [task_name(s) for s in SKILLS]


# ---- strata and estimates, from real lm-eval scores -------------------------------------


@pytest.fixture(scope="module")
def scored(micro_zoo: Path) -> dict[str, Any]:
    """Every micro checkpoint, and two merges of them, scored on every dev document."""
    request = folder_request(micro_zoo / "tasks", TASKS)
    suite = load_suite(request)
    dev = suite.doc_ids("dev")
    rm = ResidentModel(micro_zoo / "base", dtype=torch.float32)
    checkpoints = sorted(p for p in (micro_zoo / "checkpoints").iterdir() if p.is_dir())
    tensors = [read_full(p) for p in checkpoints]
    per_checkpoint: dict[str, DocScores] = {}
    for path, state in zip(checkpoints, tensors):
        rm.load_tensors(state)
        per_checkpoint[path.name] = score_documents(rm, request, "dev", dev)
    merges = []
    for weights in ([0.5, 0.5, 0, 0], [0.1, 0.2, 0.3, 0.4]):
        rm.load_tensors({k: sum(w * t[k] for w, t in zip(weights, tensors)) for k in tensors[0]})
        merges.append(score_documents(rm, request, "dev", dev))
    plan = TaskPlan.of(suite, [(t, "acc") for t in TASKS], dev)
    return {"suite": suite, "plan": plan, "checkpoints": per_checkpoint, "merges": merges}


def test_strata_are_where_the_checkpoints_agree(scored: dict[str, Any]) -> None:
    strata = Strata.build(scored["plan"], scored["checkpoints"])
    assert set(strata.tasks) == set(TASKS) and not strata.full
    for task, s in strata.tasks.items():
        columns = [c[task]["acc,none"] for c in scored["checkpoints"].values()]
        ids = strata.dev_ids[task]
        assert sorted(i for docs in s.docs.values() for i in docs) == ids
        for n, doc in enumerate(ids):
            values = {column[n] for column in columns}
            if doc in s.docs[CONTESTED]:
                assert len(values) == 2
            else:
                name = next(k for k, d in s.docs.items() if doc in d)
                assert values == {s.agreed[name][0]}
    # With one checkpoint of four allowed to dissent, a 3-to-1 document is sampled with the
    # three's value; only 2-to-2 splits stay contested.
    lenient = Strata.build(scored["plan"], scored["checkpoints"], dissent=0.25)
    for task, s in lenient.tasks.items():
        columns = [c[task]["acc,none"] for c in scored["checkpoints"].values()]
        ids = lenient.dev_ids[task]
        assert set(s.docs[CONTESTED]) < set(strata.tasks[task].docs[CONTESTED]) or not any(
            sum(column[n] for column in columns) in (1, 3) for n in range(len(ids))
        )
        for name, docs in s.docs.items():
            for doc in docs:
                values = [column[ids.index(doc)] for column in columns]
                if name == CONTESTED:
                    assert values.count(1.0) == 2
                else:
                    assert values.count(s.agreed[name][0]) >= 3
                    assert ("dissent" in name) == (values.count(s.agreed[name][0]) == 3)
    # Stored as JSON and read back, the same strata.
    record = json.loads(json.dumps(strata.record()))
    assert Strata.from_record(record) == strata


def test_an_estimate_of_every_document_is_the_full_score(scored: dict[str, Any]) -> None:
    strata = Strata.build(scored["plan"], scored["checkpoints"])
    suite = scored["suite"]
    for merge in scored["merges"]:
        full = doc_scores.aggregate(suite, merge)
        whole = strata.sample(1.0, "s")
        assert whole == strata.dev_ids
        estimate = strata.estimate(suite, merge)
        assert estimate.metrics == full  # lm-eval's own aggregate: the same floats
        assert all(v == 0.0 for task in estimate.stderr.values() for v in task.values())
        # A sample: every contested document, at least MIN_AGREED_SAMPLE of each agreed.
        sample = strata.sample(0.1, "s")
        for task, s in strata.tasks.items():
            assert set(s.docs[CONTESTED]) <= set(sample[task])
            for name, docs in s.docs.items():
                wanted = max(MIN_AGREED_SAMPLE, math.ceil(0.1 * len(docs)))
                if name != CONTESTED:
                    assert len(set(sample[task]) & set(docs)) == min(len(docs), wanted)
        assert strata.sample(0.1, "s") == sample  # seeded
        part = doc_scores.restricted(merge, sample)
        assert part is not None
        estimated = strata.estimate(suite, part)
        for task in TASKS:  # an agreed stratum the merge never flips: the same score
            s = strata.tasks[task]
            flips = sum(
                1
                for name, docs in s.docs.items()
                if name != CONTESTED
                for d in docs
                if merge[task]["acc,none"][strata.dev_ids[task].index(d)] != s.agreed[name][0]
            )
            if flips == 0:
                assert estimated.metrics[task]["acc"] == pytest.approx(full[task]["acc"])
            assert estimated.stderr[task]["acc"] > 0  # unsampled documents: never certain


def test_the_standard_error_covers_the_full_score(scored: dict[str, Any]) -> None:
    """Over many seeded samples, the full score lies within 1.96 standard errors of the
    estimate at least at the nominal 95 % (a fixed seed: the same draws every run). The
    merges get a share of their agreed documents flipped, as a merge far from the pool
    does, so that the agreed strata carry real error."""
    strata = Strata.build(scored["plan"], scored["checkpoints"])
    suite = scored["suite"]
    rng = random.Random(0)
    covered, total, errors = 0, 0, []
    for merge in scored["merges"]:
        for rate in (0.03, 0.1):
            flipped = json.loads(json.dumps(merge))
            for task in TASKS:
                s = strata.tasks[task]
                for name, docs in s.docs.items():
                    if name == CONTESTED:
                        continue
                    for d in docs:
                        if rng.random() < rate:
                            n = strata.dev_ids[task].index(d)
                            flipped[task]["acc,none"][n] = 1.0 - s.agreed[name][0]
            full = doc_scores.aggregate(suite, flipped)
            for draw in range(100):
                part = doc_scores.restricted(flipped, strata.sample(0.2, f"draw{draw}"))
                assert part is not None
                estimate = strata.estimate(suite, part)
                for task in TASKS:
                    error = estimate.metrics[task]["acc"] - full[task]["acc"]
                    se = estimate.stderr[task]["acc"]
                    covered += abs(error) <= 1.96 * se
                    total += 1
                    errors.append(se)
    assert covered / total >= 0.95
    # Not covering by being useless: the typical error is a few points, not the score's range.
    assert sorted(errors)[len(errors) // 2] < 0.1


def test_a_flipped_stratum_is_scored_in_full(scored: dict[str, Any]) -> None:
    strata = Strata.build(scored["plan"], scored["checkpoints"])
    task = TASKS[0]
    s = strata.tasks[task]
    name = max((k for k in s.docs if k != CONTESTED), key=lambda k: len(s.docs[k]))
    sample = strata.sample(0.1, "s")
    part = doc_scores.restricted(scored["checkpoints"][next(iter(scored["checkpoints"]))], sample)
    assert part is not None
    assert strata.flipped(part) == {}  # a checkpoint never flips what every checkpoint agrees on
    entry = part[task]
    for n, d in enumerate(entry[IDS]):
        if d in s.docs[name]:
            entry["acc,none"][n] = 1.0 - s.agreed[name][0]
    more = strata.flipped(part)
    assert more == {task: sorted(set(s.docs[name]) - set(sample[task]))}


def test_tasks_too_small_or_not_a_mean_are_scored_in_full(scored: dict[str, Any]) -> None:
    suite = scored["suite"]
    dev = {t: ids[:20] for t, ids in scored["plan"].dev_ids.items()}
    plan = TaskPlan.of(suite, [(TASKS[0], "acc")], dev)
    assert not plan.metrics
    assert plan.full[TASKS[0]] == "20 dev documents (fewer than 30)"
    assert plan.full[TASKS[1]] == "no objective reads it"
    assert any("scored in full" in line for line in plan.summary())


# ---- the driver, with toy documents ----------------------------------------------------


def toy_doc(task: int, doc: int, weights: list[float], flip: bool) -> float:
    """Documents ≡ 0 (mod 3): every checkpoint right; ≡ 1: every one wrong; else contested
    (checkpoint i right where doc + i is even), a merge right where its weights on the right
    checkpoints reach 1/2. `flip`: a merge far from the pool, which gets every agreed
    document the other way."""
    if (doc + task) % 3 < 2:
        agreed = float((doc + task) % 3 == 0)
        return 1.0 - agreed if flip else agreed
    return float(sum(w for i, w in enumerate(weights) if (doc + i) % 2 == 0) >= 0.5)


class ToyStrataEvaluator:
    capacity = 1

    def __init__(self, flip: bool) -> None:
        self.flip = flip
        self.pending: list[tuple[int, Recipe, str, Any]] = []
        self.asked: list[int] = []  # documents per evaluation

    def submit(self, ticket: int, recipe: Recipe, split: str, docs: Any = None) -> None:
        self.pending.append((ticket, recipe, split, docs))

    def wait(self) -> list[tuple[int, EvalResult]]:
        ticket, recipe, _split, docs = self.pending.pop()
        weights = weights_of(recipe)
        far = self.flip and max(weights) < 1.0  # a single checkpoint is never far
        if docs is None:  # the test split: every document
            metrics = {t: {"acc": 0.5} for t in TASKS}
            return [(ticket, EvalResult(ok=True, metrics=metrics))]
        self.asked.append(sum(len(i) for i in docs.values()))
        scores = {
            t: {
                IDS: sorted(docs[t]),
                "acc,none": [toy_doc(k, d, weights, far) for d in sorted(docs[t])],
            }
            for k, t in enumerate(TASKS)
        }
        return [(ticket, EvalResult(ok=True, doc_scores=scores, eval_seconds=0.01))]

    def close(self) -> None:
        pass


def _study(tmp_path: Path, zoo: Path, *, search: dict[str, Any], eval_: dict[str, Any]) -> Path:
    data = yaml.safe_load((zoo / "study.yaml").read_text())
    data.update(
        name="st",
        storage="sqlite:///study.db",
        pool={"base": str(zoo / "base"), "checkpoints": [str(zoo / "checkpoints" / "*")]},
    )
    data["eval"] = {**data["eval"], "tasks_dir": str(zoo / "tasks"), **eval_}
    data["search"] = {**data["search"], **search}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("flip", [False, True])
def test_driver_estimates_after_the_checkpoints(
    tmp_path: Path, micro_zoo: Path, flip: bool
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = _study(tmp_path, micro_zoo, search={"n_trials": 9}, eval_={"documents": "stratified"})
    prepared = prepare(load_study_spec(path))
    evaluator = ToyStrataEvaluator(flip)
    try:
        with SearchDriver(prepared, lambda: evaluator, capacity=1) as driver:
            driver.run(9)
    finally:
        prepared.pool.close()
    study = prepared.handle.study
    view = view_of(study)
    full = sum(len(i) for i in prepared.task_plan.dev_ids.values())  # type: ignore[union-attr]
    assert view.dev_docs == full
    strata = Strata.from_record(view.strata or {})
    sample = sum(len(i) for i in strata.sample(0.1, "0:strata").values())
    assert sample < full
    trials = {t.number: t for t in study.get_trials()}
    for r in view.trials:
        attrs = trials[r.number].user_attrs
        kept = attrs[TrialKey.SCORED_DOCS]
        if (r.baseline is not None and r.baseline.startswith("single:")) or r.number == 0:
            # The checkpoints (and the uniform soup, before the strata) score everything.
            assert r.docs_scored == full and r.dev_stderr is None
            assert doc_scores.n_docs(kept) == full
        elif flip:
            # Its sample flipped every agreed document: the agreed strata scored in full,
            # in a second evaluation; no estimate left.
            assert r.docs_scored == full and r.dev_stderr is None
        else:
            assert r.docs_scored == sample == doc_scores.n_docs(kept)
            assert r.dev_stderr is not None and all(v > 0 for v in r.dev_stderr.values())
            # The toy merge never flips an agreed document: the estimate is the full score.
            for k, task in enumerate(TASKS):
                ids = strata.dev_ids[task]
                exact = sum(toy_doc(k, d, r_weights(r), False) for d in ids) / len(ids)
                assert r.objectives[list(SKILLS)[k]] == pytest.approx(exact)
    # The uniform soup and the four checkpoints in full, then each trial's sample (and, where
    # it flipped, the rest of the agreed strata in a second evaluation).
    estimated = [sample, full - sample] if flip else [sample]
    assert evaluator.asked == [full] * 5 + estimated * 4
    # What it cost is what was scored.
    assert cost_of(view)[0] == pytest.approx(sum(evaluator.asked) / full)


def r_weights(record: Any) -> list[float]:
    return [float(record.weights[name]) for name in sorted(record.weights)]


# ---- refused study files and resumes ----------------------------------------------------


@pytest.mark.parametrize(
    ("search", "eval_", "message"),
    [
        (
            {"fidelity": {"rungs": [0.5, 1.0], "eta": 2}},
            {"documents": "stratified"},
            "eval.documents: stratified does not combine with search.fidelity",
        ),
        (
            {"baselines": ["uniform"]},
            {"documents": "stratified"},
            "add singles to search.baselines",
        ),
        ({}, {"agreed_sample": 0.2}, "eval.agreed_sample: only used with eval.documents"),
        ({}, {"sampled_dissent": 0.2}, "eval.sampled_dissent: only used with eval.documents"),
        ({}, {"documents": "stratified", "sampled_dissent": 0.5}, "eval.sampled_dissent"),
        ({}, {"documents": "some"}, "eval.documents"),
    ],
)
def test_bad_stratified_keys_are_one_error_line(
    tmp_path: Path,
    micro_zoo: Path,
    capsys: pytest.CaptureFixture[str],
    search: dict[str, Any],
    eval_: dict[str, Any],
    message: str,
) -> None:
    path = _study(tmp_path, micro_zoo, search=search, eval_=eval_)
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "study.db").exists()


def test_a_resume_with_other_data_is_refused(tmp_path: Path, micro_zoo: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for part in ("base", "checkpoints", "study.yaml"):
        (zoo / part).symlink_to(micro_zoo / part)
    shutil.copytree(micro_zoo / "tasks", zoo / "tasks")
    path = _study(tmp_path, zoo, search={"n_trials": 2}, eval_={"documents": "stratified"})
    prepare(load_study_spec(path)).pool.close()
    data = zoo / "tasks" / "data" / "inc.dev.jsonl"
    lines = data.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]  # the same documents, in another order
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecyclerError, match="created with a different documents"):
        prepare(load_study_spec(path))
    # Nor a resume that scores every document.
    path = _study(tmp_path, micro_zoo, search={"n_trials": 2}, eval_={})
    with pytest.raises(RecyclerError, match="different documents"):
        prepare(load_study_spec(path))


# ---- end to end, on real Ray and lm-eval -----------------------------------------------


def test_stratified_search_resumes_and_its_front_is_measured_on_test(
    tmp_path: Path, micro_zoo: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from recycler.commands.search import run_search

    path = _study(tmp_path, micro_zoo, search={"n_trials": 8}, eval_={"documents": "stratified"})
    run_search(path)
    spec = load_study_spec(path)
    study = optuna.load_study(study_name="st", storage=spec.storage_url)
    strata = study.user_attrs["recycler:strata"]
    # Resumed with more trials: the stored strata are read, not built again.
    data = yaml.safe_load(path.read_text())
    data["search"]["n_trials"] = 12
    path.write_text(yaml.safe_dump(data))
    run_search(path)
    study = optuna.load_study(study_name="st", storage=spec.storage_url)
    assert study.user_attrs["recycler:strata"] == strata
    view = view_of(study)
    full = view.dev_docs
    assert full is not None
    estimated = [r for r in view.complete if r.dev_stderr is not None]
    assert len(estimated) >= 6  # every trial after the checkpoints (and the uniform soup)
    for r in view.complete:
        kept = study.trials[r.number].user_attrs[TrialKey.SCORED_DOCS]
        assert r.docs_scored == doc_scores.n_docs(kept)
        assert (r.docs_scored < full) == (r.dev_stderr is not None)
    assert cost_of(view)[0] == pytest.approx(sum(r.docs_scored or 0 for r in view.trials) / full)
    # The front is chosen on estimates and measured on test in full: no error there.
    capsys.readouterr()
    assert main(["front", str(path), "--format", "json"]) == 0
    dev = json.loads(capsys.readouterr().out)
    assert dev["trials"]["estimated"] == len(estimated)
    assert any("stratified by acc" in line for line in dev["strata"])
    by_trial = {m["trial"]: m for m in dev["front"]}
    for r in estimated:
        if r.number in by_trial:
            assert by_trial[r.number]["stderr"] == r.dev_stderr
    assert main(["front", str(path), "--format", "json", "--split", "test"]) == 0
    test = json.loads(capsys.readouterr().out)
    assert all(m["scores"] is not None and "stderr" not in m for m in test["front"])
    assert main(["front", str(path)]) == 0
    table = capsys.readouterr().out
    assert " ± " in table and f"{len(estimated)} of them estimated" in table
