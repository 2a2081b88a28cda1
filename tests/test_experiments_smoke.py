"""Smoke tests of the experiments on the micro pool (1 seed, tiny sweeps and searches).

The scripts find their pool as WORKDIR/zoo-<size>-seed<N>; the shared micro zoo is
copied there (it is small) because the Fisher experiment writes fisher.safetensors
beside the checkpoints while it merges, and the shared fixture is read-only.
"""

from __future__ import annotations

import csv
import itertools
import shutil
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def workdir(micro_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("experiments")
    shutil.copytree(micro_zoo, work / "zoo-micro-seed0", ignore=shutil.ignore_patterns(".zoo.lock"))
    sys.path.insert(0, str(EXPERIMENTS))
    return work


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_exp_mwa_smoke(workdir: Path) -> None:
    import exp_mwa

    out = workdir / "results-mwa"
    assert (
        exp_mwa.main(
            [
                "--seeds",
                "0",
                "--size",
                "micro",
                "--workdir",
                str(workdir),
                "--penalties",
                "0",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _rows(out / "exp_mwa.csv")
    assert {r["set"] for r in rows} == {"lora", "full"}
    # p = 0 is the uniform average: the same weights, hence the same scores.
    for kind in ("lora", "full"):
        uni = next(r for r in rows if r["set"] == kind and r["method"] == "uniform")
        p0 = [r for r in rows if r["set"] == kind and r["method"] == "mwa" and float(r["p"]) == 0.0]
        assert p0 and all(r["mean4"] == uni["mean4"] and r["weights"] == uni["weights"] for r in p0)
    assert "uniform average" in (out / "exp_mwa.md").read_text()
    assert (out / "exp_mwa.png").stat().st_size > 0


def test_exp_fisher_smoke(workdir: Path) -> None:
    import exp_fisher

    out = workdir / "results-fisher"
    argv = [
        "--seeds",
        "0",
        "--size",
        "micro",
        "--workdir",
        str(workdir),
        "--examples",
        "16",
        "--no-pairs",
        "--out",
        str(out),
    ]
    assert exp_fisher.main(argv) == 0
    rows = _rows(out / "exp_fisher.csv")
    assert {(r["group"], r["method"], r["data"]) for r in rows} == {
        (g, m, d)
        for g in ("all", "finals")
        for m, d in (("average", ""), ("fisher", "own"), ("fisher", "shared"))
    }
    assert all(0.0 <= float(r["mean4"]) <= 1.0 for r in rows)
    # The merge's Fisher files are removed again: the pool is left as it was built.
    assert not list((workdir / "zoo-micro-seed0").rglob("fisher.safetensors"))
    assert (out / "exp_fisher.png").stat().st_size > 0


def test_search_experiments_smoke(workdir: Path, tmp_path: Path) -> None:
    """Experiments 1, 4, 5 and 6 on the micro pool with 4-trial searches (real Ray, lm-eval,
    SQLite)."""
    import exp_fidelity
    import exp_objectives
    import exp_recycle
    import exp_samplers
    import exp_stratified
    import ray

    common = [
        "--seeds",
        "0",
        "--size",
        "micro",
        "--workdir",
        str(workdir),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--budget",
        "4",
    ]
    out = tmp_path / "results"
    try:
        assert exp_recycle.main([*common, "--out", str(out)]) == 0
        rows = {r["kind"]: r for r in _rows(out / "exp_recycle.csv")}
        assert set(rows) == {kind for _, kind in exp_recycle.MODELS}
        # The greedy soup starts from the best single checkpoint and keeps only what helps on dev.
        assert float(rows["greedy"]["dev_mean4"]) >= float(rows["single"]["dev_mean4"])
        assert all(
            int(rows[f"tuned:{m}"]["evaluations"]) == 4
            for m in ("task_arithmetic", "ties", "dare_ties")
        )
        assert all(0.0 <= float(r["mean4"]) <= 1.0 for r in rows.values())

        # The samplers' experiment reads back the searches it shares and runs the rest.
        assert exp_samplers.main([*common, "--out", str(out)]) == 0
        runs = _rows(out / "exp_samplers.csv")
        assert {r["run"] for r in runs} == set(exp_samplers.KEYS) and all(
            r["trials"] == "4" for r in runs
        )
        hv = [[float(r[f"hv@{k}"]) for k in exp_samplers.CHECKPOINTS] for r in runs]
        assert all(0.0 <= a <= b <= 1.0 + 1e-9 for h in hv for a, b in itertools.pairwise(h))
        assert max(h[-1] for h in hv) > 0.0

        assert exp_objectives.main([*common, "--out", str(out)]) == 0
        for r in _rows(out / "exp_objectives.csv"):
            if int(r["opt_dominated_by_front"]) > 0:
                assert float(r["front_best_dev_mean4"]) >= float(r["opt_dev_mean4"])
        # Multi-fidelity against the shared tpe search, at its cost (4 full trials).
        assert exp_fidelity.main([*common, "--out", str(out), "--settings", "tpe-mf"]) == 0
        fidelity = {r["run"]: r for r in _rows(out / "exp_fidelity.csv")}
        assert set(fidelity) == {"tpe", "tpe-mf"}
        assert float(fidelity["tpe"]["hv_at_100"]) == pytest.approx(1.0)
        # It spends the budget (and may run over by the rungs its last trials won), on more
        # trials than the full-fidelity search.
        assert 4.0 <= float(fidelity["tpe-mf"]["cost"]) <= 4.0 + 2.0
        assert int(fidelity["tpe-mf"]["trials"]) > 4
        for name in ("exp_recycle", "exp_samplers", "exp_objectives", "exp_fidelity"):
            assert (out / f"{name}.png").stat().st_size > 0 and (
                out / f"{name}.md"
            ).read_text().startswith("# Experiment")
        # Stratified against every document, 8 trials (the uniform soup and 4 checkpoints in
        # full, then the search's).
        stratified_args = [*common[2:6], "--runs-dir", str(tmp_path / "strat"), "--out", str(out)]
        assert exp_stratified.main([*stratified_args, "--trials", "8", "--pools", "llama:0"]) == 0
        rows = {r["run"]: r for r in _rows(out / "exp_stratified.csv")}
        assert float(rows["all"]["test_hv"]) == pytest.approx(1.0)
        assert rows["all"]["estimated_trials"] == "0"
        for run in ("stratified", "unanimous"):  # on the micro pool's 4 checkpoints, the same
            # Up to 3: with two workers, a search trial that starts while a checkpoint is
            # still scored scores every document (the strata do not exist yet).
            estimated = int(rows[run]["estimated_trials"])
            assert 0 <= estimated <= 3
            assert (estimated > 0) == (float(rows[run]["cost_share"]) < 1.0)
        text = (out / "exp_stratified.md").read_text()
        assert text.startswith("# Experiment 7") and "control variate" in text
    finally:
        ray.shutdown()  # the experiments started a local cluster in this process
