"""Smoke test of experiments/exp_mwa.py and exp_fisher.py on the micro pool (1 seed, tiny sweep).

The scripts find their pool as WORKDIR/zoo-<size>-seed<N>; the shared micro zoo is
copied there (it is small) because the Fisher experiment writes fisher.safetensors
beside the checkpoints while it merges, and the shared fixture is read-only.
"""

from __future__ import annotations

import csv
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
    assert exp_mwa.main(["--seeds", "0", "--size", "micro", "--workdir", str(workdir), "--penalties", "0", "1", "--out", str(out)]) == 0
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
    argv = ["--seeds", "0", "--size", "micro", "--workdir", str(workdir), "--examples", "16", "--no-pairs", "--out", str(out)]
    assert exp_fisher.main(argv) == 0
    rows = _rows(out / "exp_fisher.csv")
    assert {(r["group"], r["method"], r["data"]) for r in rows} == {
        (g, m, d) for g in ("all", "finals") for m, d in (("average", ""), ("fisher", "own"), ("fisher", "shared"))
    }
    assert all(0.0 <= float(r["mean4"]) <= 1.0 for r in rows)
    # The merge's Fisher files are removed again: the pool is left as it was built.
    assert not list((workdir / "zoo-micro-seed0").rglob("fisher.safetensors"))
    assert (out / "exp_fisher.png").stat().st_size > 0
