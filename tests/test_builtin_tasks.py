"""lm-eval's built-in tasks as objectives, on local copies of their data, with a seeded
dev/test split.

Nothing is downloaded: the tests write small datasets in the exact schema of `arc_easy`
(multiple choice), `gsm8k` (generative, regex filters, few-shot from `train`), `wikitext`
(rolling log-likelihood) and two MMLU subjects (a group of built-in tasks), point
`eval.datasets` at them, run a real study on the micro pool, and score the exported knee
with lm-eval's own command line on the same documents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from recycler.cli import main
from recycler.evaluate import docsplit
from recycler.search.stored import StudyKey, TrialKey

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
MMLU_SUBJECTS = ("abstract_algebra", "anatomy")
N_TEST = 20  # documents in each scored split: 10 dev, 10 test at fraction 0.5


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def _words(i: int, n: int) -> str:
    vocab = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
    return " ".join(vocab[(i * 7 + k * 3) % len(vocab)] for k in range(n))


def _arc(i: int) -> dict[str, Any]:
    labels = ["A", "B", "C", "D"]
    return {
        "id": f"q{i}",
        "question": f"Which is {_words(i, 3)}?",
        "choices": {"text": [_words(i + k, 2) for k in range(4)], "label": labels},
        "answerKey": labels[i % 4],
    }


def _gsm8k(i: int) -> dict[str, str]:
    a, b = i % 7 + 1, i % 5 + 2
    return {
        "question": f"Tom has {a} apples and buys {b} more. How many?",
        "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
    }


def _wiki(i: int) -> dict[str, str]:
    return {"page": f" = {_words(i, 2)} = \n {_words(i + 1, 6)} . \n"}


def _mmlu(subject: str, i: int) -> dict[str, Any]:
    return {
        "question": f"{subject} {_words(i, 3)}?",
        "subject": subject,
        "choices": [_words(i + k, 2) for k in range(4)],
        "answer": i % 4,
    }


def _save(folder: Path, splits: dict[str, list[dict[str, Any]]]) -> Path:
    import datasets

    datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows) for s, rows in splits.items()}
    ).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def local_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Local copies, in the three shapes eval.datasets accepts, and a tasks folder with a small
    MMLU-style group."""
    root = tmp_path_factory.mktemp("data")
    arc = _save(
        root / "arc_easy",
        {
            "train": [_arc(i) for i in range(100, 108)],
            "validation": [_arc(i) for i in range(200, 204)],
            "test": [_arc(i) for i in range(N_TEST)],
        },
    )
    gsm = root / "gsm8k"
    gsm.mkdir()
    for split, rows in {
        "train": [_gsm8k(i) for i in range(100, 108)],
        "test": [_gsm8k(i) for i in range(N_TEST)],
    }.items():
        (gsm / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wiki = root / "wikitext"  # a Hub id with configs: FOLDER/<dataset_name> holds the copy
    _save(
        wiki / "wikitext-2-raw-v1",
        {
            "train": [_wiki(i) for i in range(100, 104)],
            "validation": [_wiki(i) for i in range(200, 204)],
            "test": [_wiki(i) for i in range(N_TEST)],
        },
    )
    mmlu = root / "mmlu"
    for subject in MMLU_SUBJECTS:
        _save(
            mmlu / subject,
            {
                "test": [
                    _mmlu(subject, i) for i in range(N_TEST + MMLU_SUBJECTS.index(subject) * 4)
                ],
                "validation": [_mmlu(subject, i) for i in range(200, 204)],
                "dev": [_mmlu(subject, i) for i in range(300, 305)],
            },
        )
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mini_mmlu.yaml").write_text(
        yaml.safe_dump(
            {
                "group": "mini_mmlu",
                "task": [f"mmlu_{s}" for s in MMLU_SUBJECTS],
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                "metadata": {"version": 1},
            }
        )
    )
    datasets_key = {
        "arc_easy": str(arc),
        "openai/gsm8k": {s: str(gsm / f"{s}.jsonl") for s in ("train", "test")},
        "EleutherAI/wikitext_document_level": str(wiki),
        "cais/mmlu": str(mmlu),
    }
    return {"root": root, "tasks": tasks, "datasets": datasets_key}


OBJECTIVES = [
    {"name": "arc", "task": "arc_easy", "metric": "acc_norm"},
    {"name": "gsm", "task": "gsm8k", "metric": "exact_match,strict-match", "num_fewshot": 1},
    {"name": "wiki", "task": "wikitext", "metric": "word_perplexity"},
    {"name": "mmlu", "task": "mini_mmlu", "metric": "acc"},
]


def study_file(
    tmp_path: Path,
    zoo: Path,
    data: dict[str, Any],
    *,
    objectives: list[dict[str, Any]] | None = None,
    **eval_keys: Any,
) -> Path:
    study = yaml.safe_load((zoo / "study.yaml").read_text())
    study["name"] = "builtin"
    study["storage"] = "sqlite:///study.db"
    study["pool"] = {"base": str(zoo / "base"), "checkpoints": [str(zoo / "checkpoints" / "*")]}
    study["objectives"] = objectives or OBJECTIVES
    study["search"] = {**study["search"], "n_trials": 2, "baselines": ["uniform"]}
    study["eval"] = {
        "tasks_dir": str(data["tasks"]),
        "datasets": data["datasets"],
        "batch_size": 16,
        "gen_kwargs": {"max_gen_toks": 4},
        **eval_keys,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def cli(*argv: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("recycler: error: "), err
    return lines[0]


def test_the_split_is_seeded_disjoint_and_covers_every_document() -> None:
    dev = docsplit.part_ids(101, 0.3, 7, "dev")
    test = docsplit.part_ids(101, 0.3, 7, "test")
    assert len(dev) == 30 and not set(dev) & set(test) and sorted(dev + test) == list(range(101))
    assert dev == docsplit.part_ids(101, 0.3, 7, "dev") and dev != docsplit.part_ids(
        101, 0.3, 8, "dev"
    )


def _cli_tasks(folder: Path, data: dict[str, Any]) -> Path:
    """lm-eval's own tasks on the same local files, written independently of recycler's overlays."""
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).parent
    yaml_of = {
        "arc_easy": "arc/arc_easy.yaml",
        "gsm8k": "gsm8k/gsm8k.yaml",
        "wikitext": "wikitext/wikitext.yaml",
        **{f"mmlu_{s}": f"mmlu/default/mmlu_{s}.yaml" for s in MMLU_SUBJECTS},
    }
    folder.mkdir()
    files: dict[str, dict[str, list[str]]] = {}
    for task, src in (
        ("arc_easy", data["root"] / "arc_easy"),
        ("wikitext", data["root"] / "wikitext" / "wikitext-2-raw-v1"),
        *((f"mmlu_{s}", data["root"] / "mmlu" / s) for s in MMLU_SUBJECTS),
    ):
        splits = json.loads((src / "dataset_dict.json").read_text())["splits"]
        files[task] = {s: [str(p) for p in sorted((src / s).glob("*.arrow"))] for s in splits}
    for task, fmt in [*((t, "arrow") for t in files), ("gsm8k", "json")]:
        data_files = files.get(task) or {
            s: [str(data["root"] / "gsm8k" / f"{s}.jsonl")] for s in ("train", "test")
        }
        cfg: dict[str, Any] = {
            "include": str(builtin / yaml_of[task]),
            "task": task,
            "dataset_path": fmt,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files},
        }
        if task == "gsm8k":
            cfg["num_fewshot"] = 1
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "mini_mmlu.yaml").write_text((data["tasks"] / "mini_mmlu.yaml").read_text())
    return folder


def test_builtin_tasks_study_matches_the_lm_eval_command_line(
    tmp_path: Path,
    micro_zoo: Path,
    local_data: dict[str, Any],
    ray_cluster: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import optuna

    path = study_file(tmp_path, micro_zoo, local_data)
    code, out, err = cli("search", path, capsys=capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="builtin", storage=f"sqlite:///{tmp_path / 'study.db'}")
    records = study.user_attrs[StudyKey.DOC_SPLIT]
    leaves = {"arc_easy", "gsm8k", "wikitext", *(f"mmlu_{s}" for s in MMLU_SUBJECTS)}
    assert set(records) == leaves
    for task, r in records.items():
        assert (r["seed"], r["fraction"], r["source"]) == (0, 0.5, "test"), task
        dev = docsplit.part_ids(r["docs"], 0.5, 0, "dev")
        assert r["dev_ids_sha256"] == docsplit.ids_digest(dev) and r["dev_docs"] == len(dev)
    directions = {o: d.name for o, d in zip(study.metric_names or [], study.directions)}
    assert directions == {
        "arc": "MAXIMIZE",
        "gsm": "MAXIMIZE",
        "wiki": "MINIMIZE",
        "mmlu": "MAXIMIZE",
    }

    code, out, _ = cli("front", path, capsys=capsys)
    assert (
        code == 0 and "documents: arc_easy: dev = 10 of the 20 documents of its 'test' split" in out
    )

    # The knee, exported and scored by `lm_eval run` on the dev documents, scores what its
    # trial did.
    code, out, err = cli("export", path, tmp_path / "knee", capsys=capsys)
    assert code == 0, err
    knee = int(out.split("exported trial ")[1].split()[0])
    stored = study.trials[knee].user_attrs[TrialKey.DEV]
    samples = {t: docsplit.part_ids(r["docs"], 0.5, 0, "dev") for t, r in records.items()}
    cli_tasks = _cli_tasks(tmp_path / "cli_tasks", local_data)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "run",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tmp_path / 'knee'},dtype=float32",
            "--device",
            "cpu",
            "--tasks",
            "arc_easy,gsm8k,wikitext,mini_mmlu",
            "--include_path",
            str(cli_tasks),
            "--samples",
            json.dumps(samples),
            "--batch_size",
            "16",
            "--gen_kwargs",
            "max_gen_toks=4",
            "--output_path",
            str(tmp_path / "lm_eval_out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out_file = next((tmp_path / "lm_eval_out").rglob("results_*.json"))
    theirs = json.loads(out_file.read_text())["results"]
    want = {
        "arc_easy": ("acc_norm,none", "acc_norm"),
        "gsm8k": ("exact_match,strict-match", "exact_match,strict-match"),
        "wikitext": ("word_perplexity,none", "word_perplexity"),
        "mini_mmlu": ("acc,none", "acc"),
    }
    for task, (their_key, our_key) in want.items():
        assert stored[task][our_key] == pytest.approx(theirs[task][their_key], rel=1e-6), task
    # The group is lm-eval's size-weighted mean of its subjects, on their dev documents.
    subjects = [f"mmlu_{s}" for s in MMLU_SUBJECTS]
    sizes = [records[t]["dev_docs"] for t in subjects]
    mean = sum(stored[t]["acc"] * n for t, n in zip(subjects, sizes)) / sum(sizes)
    assert stored["mini_mmlu"]["acc"] == pytest.approx(mean)

    # A resume keeps the split; another seed is refused before anything runs.
    study_file(tmp_path, micro_zoo, local_data)
    code, _, err = cli("search", path, "--n-trials", "3", capsys=capsys)
    assert code == 0, err
    assert (
        optuna.load_study(
            study_name="builtin", storage=f"sqlite:///{tmp_path / 'study.db'}"
        ).user_attrs[StudyKey.DOC_SPLIT]
        == records
    )
    study_file(tmp_path, micro_zoo, local_data, split_seed=1)
    line = one_error(*cli("search", path, capsys=capsys)[::2])
    assert "eval.split_seed" in line and "split seed 0" in line and "gives 1" in line


def test_bad_task_inputs_are_one_line_before_anything_starts(
    tmp_path: Path, micro_zoo: Path, local_data: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    arc = [{"name": "arc", "task": "arc_easy", "metric": "acc"}]

    def error(objectives: list[dict[str, Any]] | None = None, **eval_keys: Any) -> str:
        path = study_file(
            tmp_path, micro_zoo, local_data, objectives=objectives or arc, **eval_keys
        )
        code, _, err = cli("search", path, capsys=capsys)
        line = one_error(code, err)
        assert not (tmp_path / "study.db").exists(), f"a study was created before: {line}"
        return line

    line = error([{"name": "arc", "task": "arc_eazy", "metric": "acc"}])
    assert "objectives.0.task" in line and "'arc_eazy'" in line and "arc_easy" in line
    line = error([{"name": "arc", "task": "arc_easy", "metric": "accuracy"}])
    assert "objectives.0.metric" in line and "acc_norm" in line
    line = error([{"name": "g", "task": "gsm8k", "metric": "exact_match,strict"}])
    assert "no filter 'strict'" in line and "strict-match" in line
    line = error(dev_fraction=1.5)
    assert "eval.dev_fraction" in line
    line = error(dev_fraction=0.95)
    assert "eval.dev_fraction" in line and "'arc_easy'" in line and "at least 10" in line
    only_train = {
        **local_data["datasets"],
        "arc_easy": {"train": str(local_data["root"] / "gsm8k" / "train.jsonl")},
    }
    line = error(datasets=only_train)
    assert "eval.datasets.arc_easy" in line and "'test'" in line
    line = error([{"name": "c", "task": "arc_challenge", "metric": "acc"}])
    assert (
        "'arc_challenge'" in line
        and "allenai/ai2_arc" in line
        and "eval.datasets.arc_challenge" in line
    )
    assert not (tmp_path / "study.db").exists()
