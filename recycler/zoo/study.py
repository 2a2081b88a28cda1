"""Write DIR/study.yaml: a ready study over the zoo, in DESIGN.md's study-file format.

Paths are relative to the study file (so to DIR), which is how recycler reads
them: the zoo can be moved and the study still finds its pool and tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from recycler.zoo.spec import ZooSpec
from recycler.zoo.tasks import task_name


def study_dict(spec: ZooSpec, task_names: list[str]) -> dict[str, Any]:
    skills = [t.removeprefix(task_name("")) for t in task_names]
    return {
        "name": f"zoo-{spec.size}",
        "storage": "sqlite:///recycler.db",
        "pool": {"base": "base", "checkpoints": ["checkpoints/*"]},
        # float32: the zoo's deltas are small, and it is how scores.json was measured.
        "merge": {"method": "linear", "dtype": "float32", "params": {}},
        # The defaults experiments 1 and 4 chose (experiments/README.md): TPE, 50 trials, the
        # uniform soup and single checkpoints as baselines, one weight per checkpoint and
        # layer half on the small pool (the micro pool, for tests, keeps one per checkpoint).
        "search": {
            "weights": "simplex",
            "granularity": "layers:2" if spec.size == "small" else "model",
            "sampler": "tpe",
            "n_trials": 50 if spec.size == "small" else 12,
            "seed": 0,
            "seeds": ["uniform", "singles"],
        },
        "objectives": [{"name": s, "task": t, "metric": "acc"} for s, t in zip(skills, task_names)],
        "eval": {
            "tasks_dir": "tasks",
            "split": "dev",
            "limit": None,
            "batch_size": spec.eval_batch_size,
        },
        "cluster": {"address": None, "shard_workers": 1, "eval_workers": 1, "gpus_per_worker": 0},
    }


def write_study(zoo_dir: Path, spec: ZooSpec, task_names: list[str]) -> Path:
    path = zoo_dir / "study.yaml"
    header = (
        "# A study over the demo pool (written by `recycler zoo build`). Paths are relative\n"
        "# to this file. Run it with: recycler search study.yaml\n"
    )
    path.write_text(header + yaml.safe_dump(study_dict(spec, task_names), sort_keys=False))
    return path
