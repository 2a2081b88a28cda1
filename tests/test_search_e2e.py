"""The search end to end on the micro pool: real Optuna on SQLite, a real local Ray, real lm-eval.

One Ray cluster serves every test here (RayEvaluator reuses an initialised Ray); the
SIGKILL test runs `recycler search` as a subprocess, which starts its own.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from killing import kill_at
from optuna.trial import FrozenTrial

from recycler.cli import main
from recycler.commands.search import run_search
from recycler.config import load_study_spec
from recycler.search.prepare import prepare
from recycler.search.stored import StudyKey, TrialKey

OBJECTIVES = [
    {"name": "inc", "task": "zoo_inc", "metric": "acc"},
    {"name": "rev", "task": "zoo_rev", "metric": "acc"},
]


def study_file(
    tmp_path: Path, zoo: Path, *, tasks_dir: Path | None = None, **sections: dict[str, Any]
) -> Path:
    """The zoo's study with absolute paths into the (read-only) zoo and its storage in tmp_path."""
    data = yaml.safe_load((zoo / "study.yaml").read_text())
    data["name"] = "e2e"
    data["storage"] = "sqlite:///study.db"
    data["pool"] = {"base": str(zoo / "base"), "checkpoints": [str(zoo / "checkpoints" / "*")]}
    data["objectives"] = OBJECTIVES
    data["eval"]["tasks_dir"] = str(tasks_dir or zoo / "tasks")
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load(path: Path) -> optuna.Study:
    spec = load_study_spec(path)
    return optuna.load_study(study_name=spec.name, storage=spec.storage_url)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state.is_finished()]


def cli(*argv: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_search_front_export_report_and_resume(
    tmp_path: Path, micro_zoo: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    study_path = study_file(
        tmp_path, micro_zoo, search={"n_trials": 9, "baselines": ["uniform", "singles", "greedy"]}
    )
    started = time.perf_counter()
    assert cli("search", study_path, capsys=capsys)[0] == 0
    search_seconds = time.perf_counter() - started
    print(f"search of 9 trials: {search_seconds:.1f} s", file=sys.stderr)
    study = load(study_path)
    names = sorted(p.name for p in (micro_zoo / "checkpoints").iterdir())
    trials = study.get_trials()
    assert len(trials) == 9 and all(t.state.name == "COMPLETE" for t in trials)
    assert study.metric_names == ["inc", "rev"]
    # Baselines come first, with their exact weights, then the greedy soup's steps.
    assert [t.user_attrs.get(TrialKey.BASELINE) for t in trials[: 1 + len(names)]] == [
        "uniform",
        *(f"single:{n}" for n in names),
    ]
    assert trials[1].user_attrs[TrialKey.WEIGHTS] == {
        n: (1.0 if i == 0 else 0.0) for i, n in enumerate(names)
    }
    assert any(t.user_attrs.get(TrialKey.BASELINE) == "greedy" for t in trials)
    for t in trials:
        ua = t.user_attrs
        assert set(ua[TrialKey.WEIGHTS]) == set(names) and math.isclose(
            sum(ua[TrialKey.WEIGHTS].values()), 1.0, abs_tol=1e-5
        )
        assert set(ua["dev"]) == {"zoo_inc", "zoo_rev"} and ua["objectives"] == {
            "inc": t.values[0],
            "rev": t.values[1],
        }
        assert ua["dev"]["zoo_inc"]["acc"] == t.values[0]
        assert ua["recipe"]["merge_method"] == "linear"
    fresh = [t for t in trials if TrialKey.CACHE_HIT not in t.user_attrs]
    timings = [
        (t.user_attrs[TrialKey.MERGE_SECONDS], t.user_attrs[TrialKey.EVAL_SECONDS]) for t in trials
    ]
    # A merged trial took time to merge and to score; a cache hit did neither. One evaluation
    # worker scores one trial at a time, so together they fit in the search's own time.
    assert all((m > 0 and e > 0) == (t in fresh) for t, (m, e) in zip(trials, timings))
    assert all(m == e == 0 for t, (m, e) in zip(trials, timings) if t not in fresh)
    assert sum(m + e for m, e in timings) < search_seconds

    # front --format json: the Pareto set by brute force over the dev scores, each re-scored
    # on test.
    code, out, _ = cli("front", study_path, "--format", "json", capsys=capsys)
    assert code == 0
    front = json.loads(out)
    values = {t.number: t.values for t in trials}
    brute = {
        n
        for n, v in values.items()
        if not any(all(w[k] >= v[k] for k in range(2)) and w != v for w in values.values())
    }
    assert {m["trial"] for m in front["front"]} == brute
    assert front["knee"] in brute
    # The hypervolume on dev: the area the front dominates up to the worst dev scores.
    reference = [min(v[k] for v in values.values()) for k in range(2)]
    area, floor = 0.0, reference[1]
    for inc, rev in sorted((values[n] for n in brute), reverse=True):  # inc falls, rev rises
        area += (inc - reference[0]) * (rev - floor)
        floor = rev
    assert front["reference"] == pytest.approx(reference)
    assert front["hypervolume"] == pytest.approx(area)
    for m in front["front"]:
        test = study.user_attrs[f"{StudyKey.TEST_PREFIX}{m['trial']}"]
        assert set(test["objectives"]) == {"inc", "rev"} and set(test["metrics"]) == {
            "zoo_inc",
            "zoo_rev",
        }
    code, out, _ = cli("front", study_path, "--split", "test", "--format", "csv", capsys=capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {int(r["trial"]) for r in rows if r["role"] == "front"} == brute
    for r in rows:
        assert r["inc"] != "" and r["rev"] != ""  # baselines were re-scored on test too
    code, out, _ = cli("front", study_path, capsys=capsys)
    assert code == 0 and "Pareto set of study e2e" in out and "hypervolume on dev" in out

    # export the knee; the exported model, evaluated again, scores what its trial scored.
    out_dir = tmp_path / "knee"
    code, out, _ = cli("export", study_path, out_dir, capsys=capsys)
    assert code == 0 and f"exported trial {front['knee']}" in out
    from recycler.evaluate.model import ResidentModel
    from recycler.evaluate.runner import evaluate_tasks
    from recycler.evaluate.tasks import folder_request

    rescored = evaluate_tasks(
        ResidentModel(out_dir, dtype=__import__("torch").float32),
        folder_request(micro_zoo / "tasks", ["zoo_inc", "zoo_rev"]),
        "dev",
        batch_size=64,
    )
    stored = study.trials[front["knee"]].user_attrs[TrialKey.DEV]
    assert {t: m["acc"] for t, m in rescored.items()} == {t: m["acc"] for t, m in stored.items()}
    card = (out_dir / "README.md").read_text()
    assert (
        f"trial: {front['knee']}" in card and "scores on dev" in card and "scores on test" in card
    )
    assert (out_dir / "recipe.yaml").is_file()
    code, _, err = cli("export", study_path, tmp_path / "best", "--pick", "best:rev", capsys=capsys)
    assert code == 0, err
    best_rev = max(trials, key=lambda t: (t.values[1], -t.number)).number
    assert f"trial: {best_rev}" in (tmp_path / "best" / "README.md").read_text()

    # report: HTML and the three plots.
    code, _, err = cli("report", study_path, tmp_path / "report", capsys=capsys)
    assert code == 0, err
    html = (tmp_path / "report" / "index.html").read_text()
    for png in ("pareto.png", "hypervolume.png", "weights.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000 and png in html

    # Resume to 11 in total: the first 9 stay as they were.
    run_search(study_path, 11)
    again = load(study_path).get_trials()
    assert len(finished(load(study_path))) == 11
    assert [(t.params, t.values) for t in again[:9]] == [(t.params, t.values) for t in trials]


def test_failing_trials_are_recorded_and_the_study_goes_on(
    tmp_path: Path, micro_zoo: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # A test split whose last question has no choices: lm-eval builds the task (it checks the
    # first question only), the search on dev works, and scoring test fails inside lm-eval.
    tasks = tmp_path / "tasks"
    shutil.copytree(micro_zoo / "tasks", tasks)
    data = tasks / "data" / "rev.test.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    rows[-1]["choices"] = []
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    study_path = study_file(
        tmp_path,
        micro_zoo,
        tasks_dir=tasks,
        search={"weights": "box", "bounds": [0.0, 1.0], "n_trials": 3, "baselines": ["uniform"]},
    )
    prepared = prepare(load_study_spec(study_path))
    # All-zero box weights: linear's normalize has nothing to divide by.
    bad = {name: 0.0 for name in prepared.space.param_names()}
    prepared.handle.study.enqueue_trial(bad, user_attrs={"note": "bad"})
    assert cli("search", study_path, capsys=capsys)[0] == 0
    study = load(study_path)
    states = [t.state.name for t in study.get_trials()]
    # The failed trial counts toward no n_trials: 3 with a result, and it besides.
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "the weights sum to zero" in study.trials[1].user_attrs[TrialKey.FAIL_REASON]
    errors = [v["error"] for k, v in study.user_attrs.items() if k.startswith(StudyKey.TEST_PREFIX)]
    assert errors and all(e.startswith("ValueError: ") for e in errors)
    code, out, _ = cli("front", study_path, "--split", "test", capsys=capsys)
    assert code == 0 and "n/a" in out

    # A merge that overflows: every trial fails in the worker with the tensor named, none is
    # lost, and the first three failing alike stop the search with one error line.
    other = tmp_path / "overflow"
    other.mkdir()
    path = study_file(
        other,
        micro_zoo,
        merge={"dtype": "float16", "params": {"normalize": False}},
        search={
            "weights": "box",
            "bounds": [1.0e6, 2.0e6],
            "n_trials": 2,
            "baselines": ["uniform"],
            "sampler": "random",
        },
    )
    code, _, err = cli("search", path, capsys=capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("recycler: error: search: stopped after its first 3 ")
    assert "non-finite values" in last and err.count("recycler: error:") == 1
    failed = load(path).get_trials()
    assert [t.state.name for t in failed] == ["FAIL", "FAIL", "FAIL"]
    assert all("non-finite values" in t.user_attrs[TrialKey.FAIL_REASON] for t in failed)
    code, _, err = cli("front", path, capsys=capsys)
    assert code == 2 and err.startswith("recycler: error: study 'e2e' has no completed trial yet")


# The zoo's `inc` task as a generative one: its answers generated, then matched exactly.
GENERATIVE_TASK = """\
include: _zoo_common.yaml
task: zoo_inc_gen
dataset_kwargs:
  skill: inc
output_type: generate_until
generation_kwargs:
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def test_a_config_that_fails_every_evaluation_stops_before_the_search_and_is_rerun_fixed(
    tmp_path: Path, micro_zoo: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(micro_zoo / "tasks", tasks)
    (tasks / "zoo_inc_gen.yaml").write_text(GENERATIVE_TASK)

    def write_study(max_gen_toks: int) -> Path:
        path = study_file(
            tmp_path,
            micro_zoo,
            tasks_dir=tasks,
            search={"n_trials": 6, "baselines": ["uniform", "singles"]},
            eval={"gen_kwargs": {"max_gen_toks": max_gen_toks}},
        )
        data = yaml.safe_load(path.read_text())
        data["objectives"] = [
            OBJECTIVES[0],
            {"name": "gen", "task": "zoo_inc_gen", "metric": "exact_match"},
        ]
        path.write_text(yaml.safe_dump(data))
        return path

    # 64 tokens to generate do not fit the micro model's context of 32: lm-eval refuses
    # every evaluation. One document per task, scored before the search, says so.
    started = time.perf_counter()
    code, _, err = cli("search", write_study(64), capsys=capsys)
    seconds = time.perf_counter() - started
    last = err.strip().splitlines()[-1]
    assert code == 2 and err.count("recycler: error:") == 1, err
    assert last.startswith("recycler: error: objectives: tasks zoo_inc (inc), zoo_inc_gen (gen)")
    assert "AssertionError: Invalid configuration: requested max tokens to generate (64)" in last
    assert seconds < 60
    study = load(tmp_path / "study.yaml")
    assert {t.state.name for t in study.get_trials()} == {"WAITING"}  # no trial was spent
    # Fixed, the same study runs its 6 trials, every baseline among them.
    code, _, err = cli("search", write_study(4), capsys=capsys)
    assert code == 0, err
    trials = load(tmp_path / "study.yaml").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    names = sorted(p.name for p in (micro_zoo / "checkpoints").iterdir())
    assert [t.user_attrs.get(TrialKey.BASELINE) for t in trials[:5]] == [
        "uniform",
        *(f"single:{n}" for n in names),
    ]
    assert "gen" in trials[0].user_attrs[TrialKey.OBJECTIVES]


def _reached(trials: list[FrozenTrial], complete: int = 2, running: bool = True) -> bool:
    """`complete` trials complete and (where `running`) one running that its process has
    claimed and whose parameters are proposed (a sampled one's, or an enqueued one's)."""
    return sum(t.state.name == "COMPLETE" for t in trials) >= complete and (
        not running
        or any(
            t.state.name == "RUNNING"
            and TrialKey.OWNER in t.user_attrs
            and (t.params or t.user_attrs.get(TrialKey.ENQUEUED_PARAMS))
            for t in trials
        )
    )


def test_resume_after_sigkill_loses_nothing(
    tmp_path: Path, micro_zoo: Path, ray_cluster: None
) -> None:
    study_path = study_file(
        tmp_path, micro_zoo, search={"n_trials": 6, "baselines": ["uniform", "singles"]}
    )
    url = load_study_spec(study_path).storage_url
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recycler.cli", "search", str(study_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        # The driver, at a moment a trial with something to re-run is in flight.
        kill_at(
            proc,
            lambda _, trials: _reached(trials, complete=1, running=False),
            _reached,
            "a proposed trial in flight",
            storage_url=url,
            study="e2e",
        )
    finally:
        # Ray's own processes of that driver (same session) are left behind by a SIGKILL: clean up.
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    before = optuna.load_study(study_name="e2e", storage=url).get_trials()
    complete_before = {t.number: (t.params, t.values) for t in before if t.state.name == "COMPLETE"}
    running = [t for t in before if t.state.name == "RUNNING"]
    assert len(running) == 1 and len(complete_before) >= 2

    run_search(study_path, None)  # resume in this process (the shared Ray)
    after = optuna.load_study(study_name="e2e", storage=url).get_trials()
    for number, (params, values) in complete_before.items():
        assert (after[number].params, after[number].values) == (
            params,
            values,
        )  # nothing completed is lost
    stale = after[running[0].number]
    assert stale.state.name == "FAIL" and stale.user_attrs[TrialKey.FAIL_REASON].startswith(
        "stale: the process"
    )
    reruns = [t for t in after if t.user_attrs.get(TrialKey.RERUN_OF) == stale.number]
    # The re-run has every parameter of the killed trial, even those the kill kept from
    # being stored (Optuna stores them one call at a time): an enqueued trial's from its
    # record, a sampled one's from the trial plus the sampler for the rest.
    intended = stale.user_attrs.get(TrialKey.ENQUEUED_PARAMS) or stale.params
    assert len(reruns) == 1 and reruns[0].state.name == "COMPLETE"
    assert reruns[0].params.items() >= intended.items() and len(reruns[0].params) == len(
        after[0].params
    )
    counted = [
        t
        for t in after
        if t.state.name == "COMPLETE"
        or (t.state.name == "FAIL" and not t.user_attrs.get(TrialKey.STALE))
    ]
    assert len(counted) == 6 and all(t.state.name == "COMPLETE" for t in counted)


def test_demo_on_the_micro_pool(
    tmp_path: Path, micro_zoo: Path, ray_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # The demo reuses a complete pool in its work folder: give it a copy of the shared one.
    shutil.copytree(micro_zoo, tmp_path / "zoo-micro")
    code, out, err = cli(
        "demo", "--workdir", tmp_path, "--size", "micro", "--n-trials", "8", capsys=capsys
    )
    assert code == 0, err
    assert "the micro pool in" in err and "Pareto set of study zoo-micro" in out
    assert (tmp_path / "knee-model" / "config.json").is_file()
    assert (tmp_path / "report" / "index.html").is_file()
    assert "recycler dashboard" in out and "demo done in" in out
    assert len(finished(load(tmp_path / "zoo-micro" / "study.yaml"))) == 8


def test_search_with_two_evaluation_and_two_shard_workers(
    tmp_path: Path, micro_zoo: Path, ray_cluster: None
) -> None:
    """The same study end to end with the pool sharded and two trials in flight."""
    study_path = study_file(
        tmp_path,
        micro_zoo,
        cluster={"shard_workers": 2, "eval_workers": 2},
        search={"n_trials": 8, "baselines": ["uniform"]},
        eval={"limit": 16},
    )
    run_search(study_path, None)
    trials = finished(load(study_path))
    assert len(trials) == 8
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [
        t.user_attrs for t in trials
    ]
    # Two workers overlapped: some trial started before the one before it finished.
    ordered = sorted(trials, key=lambda t: t.datetime_start)
    assert any(b.datetime_start < a.datetime_complete for a, b in itertools.pairwise(ordered))
