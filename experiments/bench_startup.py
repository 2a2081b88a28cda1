"""Start-up of `recycler search` on the micro demo pool: seconds from the command's start
to its first finished trial, and where they go (the phases it prints on stderr).

    python experiments/bench_startup.py [--repeats 3]     # make bench-startup

Each run is a fresh process on a fresh study (SQLite), as a user's first search is; the
micro pool is built once into tests/.cache (as the tests build it). Writes
experiments/results/bench_startup.md and .json with this machine's figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from recycler.zoo.build import build_zoo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
# "  1.2 s  starting Ray; checking the study, indexing the pool …" (commands/search.phase,
# printed with -v)
PHASE = re.compile(r"^\s*([0-9.]+) s  (.*?) …$")
FIRST_TRIAL = re.compile(r"^trial \d+ \[.*\] complete")


def micro_pool() -> Path:
    """The tests' micro zoo (tests/conftest.py names it by the zoo's source hash)."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "recycler" / "zoo").glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return build_zoo(
        ROOT / "tests" / ".cache" / f"zoo-micro-{digest.hexdigest()[:12]}",
        size="micro",
        seed=0,
        quiet=True,
    )


def one_run(zoo: Path, folder: Path) -> dict[str, Any]:
    """One `recycler search` of 2 trials; the time of each phase line and of the first trial."""
    data = yaml.safe_load((zoo / "study.yaml").read_text())
    data.update(name="startup", storage="sqlite:///study.db")
    data["pool"] = {"base": str(zoo / "base"), "checkpoints": [str(zoo / "checkpoints" / "*")]}
    data["eval"]["tasks_dir"] = str(zoo / "tasks")
    data["search"] = {**data.get("search", {}), "n_trials": 2, "baselines": ["uniform"]}
    study = folder / "study.yaml"
    study.write_text(yaml.safe_dump(data))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "recycler", "search", "-v", str(study)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=folder,
    )
    assert proc.stderr is not None
    # (what began, seconds from the process's start when its line arrived)
    phases: list[tuple[str, float]] = [("Python and the command's imports", 0.0)]
    first: float | None = None
    for line in proc.stderr:
        match = PHASE.match(line.rstrip("\n"))
        if match:
            phases.append((match.group(2), time.perf_counter() - started))
        elif first is None and FIRST_TRIAL.match(line):
            first = time.perf_counter() - started
    if proc.wait(timeout=600) != 0 or first is None:
        raise SystemExit(f"the search failed (exit {proc.returncode})")
    ends = [at for _, at in phases[1:]] + [first]
    return {
        "first_trial_s": first,
        "phases": {name: end - at for (name, at), end in zip(phases, ends)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    zoo = micro_pool()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_run(zoo, Path(tmp)))
    first = [float(r["first_trial_s"]) for r in runs]
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    )
    (RESULTS / "bench_startup.json").write_text(
        json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n"
    )
    lines = [
        "# Start-up: `recycler search` on the micro pool to its first finished trial",
        "",
        f"Written by `experiments/bench_startup.py` on {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{machine}; {len(runs)} fresh processes, fresh studies.",
        "",
        f"First finished trial: median {statistics.median(first):.1f} s "
        f"(min {min(first):.1f}, max {max(first):.1f}), from the process's start.",
        "",
        "| phase (until the next one; the last until the first finished trial) | median s |",
        "|---|---|",
    ]
    for name in runs[0]["phases"]:
        median = statistics.median(r["phases"][name] for r in runs)
        lines.append(f"| {name} | {median:.1f} |")
    (RESULTS / "bench_startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
