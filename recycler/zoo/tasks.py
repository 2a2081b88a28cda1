"""Write the demo pool's lm-eval task suite: one multiple-choice task per skill, a group `zoo`.

Layout of DIR/tasks:
  _zoo_common.yaml        keys every task shares (included by each task YAML)
  zoo_<skill>.yaml        one task per skill; `test_split: test`
  zoo.yaml                the group (macro-average of acc over the skills)
  zoo_data.py             loads data/<skill>.<split>.jsonl next to itself
  data/<skill>.{dev,test}.jsonl

The data are loaded by a small function beside the YAMLs rather than by
`dataset_path: json` + `data_files`, because lm-eval resolves `data_files`
against the current directory: this way the folder can be moved or copied
and still loads, from any working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from recycler.zoo.skills import HELD_OUT, SKILLS, Example

GROUP = "zoo"
SPLITS = ("dev", "test")


def task_name(skill: str) -> str:
    return f"zoo_{skill}"


_COMMON = """\
# Shared by every zoo task (written by `recycler zoo build`).
custom_dataset: !function zoo_data.load
output_type: multiple_choice
test_split: test
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
# The tokenizer is character-level with no space token: the answer follows
# the prompt's '=' directly.
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_LOADER = '''\
"""Load a zoo task's splits from data/<skill>.<split>.jsonl beside this file (written by recycler)."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(skill, **_ignored):
    splits = {}
    for path in sorted((HERE / "data").glob(f"{skill}.*.jsonl")):
        split = path.name[len(skill) + 1 : -len(".jsonl")]
        with path.open() as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
'''


def _task_yaml(skill: str) -> str:
    note = " (held out: no fine-tuning run emphasises it)" if skill == HELD_OUT else ""
    return (
        f"# {SKILLS[skill].description}{note}\n"
        "include: _zoo_common.yaml\n"
        f"task: {task_name(skill)}\n"
        f"dataset_kwargs:\n  skill: {skill}\n"
        "metadata:\n  version: 1\n"
    )


def _group_yaml(skills: list[str]) -> str:
    lines = [f"group: {GROUP}", "task:"] + [f"  - {task_name(s)}" for s in skills]
    lines += [
        "aggregate_metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    weight_by_size: false",
        "metadata:",
        "  version: 1",
    ]
    return "\n".join(lines) + "\n"


def write_tasks(tasks_dir: Path, data: dict[str, dict[str, list[Example]]]) -> list[str]:
    """Write the suite for `data` (skill -> split -> examples); return the task names."""
    (tasks_dir / "data").mkdir(parents=True, exist_ok=True)
    (tasks_dir / "_zoo_common.yaml").write_text(_COMMON)
    (tasks_dir / "zoo_data.py").write_text(_LOADER)
    skills = list(data)
    for skill in skills:
        (tasks_dir / f"{task_name(skill)}.yaml").write_text(_task_yaml(skill))
        for split in SPLITS:
            rows = [
                {"prompt": e.prompt, "choices": list(e.choices), "gold": e.gold}
                for e in data[skill][split]
            ]
            with (tasks_dir / "data" / f"{skill}.{split}.jsonl").open("w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
    (tasks_dir / f"{GROUP}.yaml").write_text(_group_yaml(skills))
    return [task_name(s) for s in skills]
