"""The study file: every key validated, errors name the key, relative paths resolved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from recycler import study_keys
from recycler.config import load_study_spec
from recycler.errors import RecyclerError
from recycler.evaluate.tasks import suite_request
from recycler.merge.recipe import Recipe

BASE: dict[str, Any] = {
    "name": "demo",
    "pool": {"base": "zoo/base", "checkpoints": ["zoo/checkpoints/*"]},
    "eval": {"tasks_dir": "."},
    "objectives": [
        {"name": "arith", "task": "zoo_arith", "metric": "acc"},
        {"name": "reverse", "task": "zoo_reverse", "metric": "acc"},
    ],
}


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def merged(**overrides: Any) -> dict[str, Any]:
    out = dict(BASE)
    for key, value in overrides.items():
        out[key] = (
            {**out.get(key, {}), **value}
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def error_of(tmp_path: Path, data: Any) -> str:
    with pytest.raises(RecyclerError) as info:
        load_study_spec(write(tmp_path, data))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_and_paths_resolved_against_the_study_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "zoo" / "tasks").mkdir(parents=True)
    data = merged(eval={"tasks_dir": "zoo/tasks"})
    assert data["eval"] == {"tasks_dir": "zoo/tasks"}
    path = write(tmp_path, data)
    monkeypatch.chdir("/")  # the working directory must not matter
    spec = load_study_spec(path)
    assert spec.storage_url == f"sqlite:///{tmp_path.resolve()}/recycler.db"
    assert spec.sqlite_path == tmp_path.resolve() / "recycler.db"
    assert spec.base_path == tmp_path.resolve() / "zoo" / "base"
    assert spec.task_dirs == [tmp_path.resolve() / "zoo" / "tasks"]
    assert spec.merge.method == "linear" and spec.merge.dtype == "bfloat16"
    s = spec.search
    assert (s.weights, s.granularity, s.sampler, s.n_trials, s.seed) == (
        "simplex",
        "model",
        "tpe",
        50,
        0,
    )
    assert s.baselines == ["uniform", "singles"]
    assert spec.eval.split == "dev" and spec.eval.batch_size == 32 and spec.eval.limit is None
    assert spec.cluster.address is None and spec.cluster.eval_workers == 1


def test_absolute_and_server_storage_urls_are_kept(tmp_path: Path) -> None:
    spec = load_study_spec(write(tmp_path, merged(storage="sqlite:////var/tmp/x.db")))
    assert spec.storage_url == "sqlite:////var/tmp/x.db"
    spec = load_study_spec(write(tmp_path, merged(storage="postgresql://u@db/optuna")))
    assert spec.storage_url == "postgresql://u@db/optuna" and spec.sqlite_path is None


def test_full_file_with_every_key(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    data = {
        "name": "full",
        "storage": "sqlite:///s.db",
        "pool": {"base": "b", "checkpoints": ["c/*", "d"]},
        "merge": {"method": "ties", "dtype": "float32", "params": {"normalize": True}},
        "search": {
            "weights": "box",
            "bounds": [0.0, 2.0],
            "granularity": "layers:4",
            "tune": ["density", {"lambda": [0.5, 2.0]}],
            "sampler": "nsga2",
            "n_trials": 7,
            "seed": 3,
            "baselines": ["uniform", "mwa_step"],
        },
        "objectives": [
            {"name": "a", "task": "t1", "metric": "acc", "direction": "maximize"},
            {"name": "ppl", "task": "t2", "metric": "word_perplexity", "direction": "minimize"},
        ],
        "eval": {"tasks_dir": "tasks", "split": "dev", "limit": 10, "batch_size": 4},
        "cluster": {
            "address": "auto",
            "shard_workers": 2,
            "eval_workers": 2,
            "gpus_per_worker": 0.5,
        },
    }
    spec = load_study_spec(write(tmp_path, data))
    assert spec.search.layer_groups == 4
    assert [(t.name, t.low, t.high) for t in spec.search.tune] == [
        ("density", 0.1, 1.0),
        ("lambda", 0.5, 2.0),
    ]
    assert spec.objectives[1].direction == "minimize"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            merged(search={"sampler": "sobol"}),
            "study.yaml: search.sampler: must be one of tpe, nsga2, gp, random, cmaes",
        ),
        (merged(colour="red"), "study.yaml: colour: unknown key"),
        (merged(search={"samplr": "tpe"}), "study.yaml: search.samplr: unknown key"),
        ({k: v for k, v in BASE.items() if k != "name"}, "study.yaml: name: required"),
        (
            merged(merge={"method": "frankenmerge"}),
            "study.yaml: merge.method: must be one of linear, task_arithmetic",
        ),
        (
            merged(merge={"method": "slerp"}),
            "study.yaml: merge.params: t: required by slerp: set it here or tune it",
        ),
        (
            merged(
                merge={"method": "slerp", "params": {"t": 0.5}},
                pool={"base": "base", "checkpoints": ["a", "b"]},
            ),
            "study.yaml: pool.checkpoints: slerp takes 1 checkpoint beside the base, got 2",
        ),
        (
            merged(
                merge={"method": "model_stock"}, pool={"base": "base", "checkpoints": ["a", "b"]}
            ),
            "study.yaml: merge.method: model_stock has nothing to search: it reads no weights "
            "and has no parameter a search can tune",
        ),
        (
            merged(
                merge={"method": "della"},
                pool={"base": "base", "checkpoints": ["a", "b"]},
                search={"tune": ["t"]},
            ),
            "study.yaml: search.tune: t is not a parameter of della that a search can tune "
            "(tunable: density, epsilon, lambda)",
        ),
        (
            merged(
                merge={"method": "sce"},
                pool={"base": "base", "checkpoints": ["a", "b"]},
                search={"tune": [{"select_topk": [0.0, 1.0]}]},
            ),
            "study.yaml: search.tune: select_topk: range [0, 1] leaves (0, 1]",
        ),
        (
            merged(
                merge={"method": "ties", "params": {"t": 0.5}},
                pool={"base": "base", "checkpoints": ["a", "b"]},
            ),
            "study.yaml: merge.params: t: unknown parameter for ties",
        ),
        (
            merged(search={"granularity": "layers:0"}),
            "study.yaml: search.granularity: must be model, blocks or layers:K",
        ),
        (
            merged(search={"weights": "box", "bounds": [1, 0]}),
            "study.yaml: search.bounds: must be [low, high] with low < high",
        ),
        (
            merged(search={"bounds": [0, 2]}),
            "study.yaml: search.bounds: only used with weights: box",
        ),
        (
            merged(search={"tune": ["density"]}),
            "study.yaml: search.tune: density is not a parameter of linear that a search can "
            "tune (tunable: none)",
        ),
        (
            merged(search={"tune": ["temperature"]}),
            "study.yaml: search.tune: temperature is not a parameter of linear that a search "
            "can tune (tunable: none)",
        ),
        (
            # a misspelling lists this method's tunables, not every method's
            merged(
                merge={"method": "ties"},
                pool={"base": "base", "checkpoints": ["a", "b"]},
                search={"tune": ["densty", {"lamda": [0.5, 1.0]}]},
            ),
            "study.yaml: search.tune: densty is not a parameter of ties that a search can tune "
            "(tunable: density, lambda)",
        ),
        (
            merged(
                merge={"method": "ties"},
                pool={"base": "base", "checkpoints": ["a", "b"]},
                search={"tune": [{"lamda": [0.5, 1.0]}]},
            ),
            "study.yaml: search.tune: lamda is not a parameter of ties that a search can tune "
            "(tunable: density, lambda)",
        ),
        (
            merged(
                merge={"method": "ties", "params": {"density": 0.5}}, search={"tune": ["density"]}
            ),
            "study.yaml: search.tune: density is fixed in merge.params and searched",
        ),
        (
            merged(merge={"params": {"weight": 1.0}}),
            "study.yaml: merge.params: weight: unknown parameter for linear (known: normalize)",
        ),
        (
            merged(merge={"params": {"normalize": 1}}),
            "study.yaml: merge.params: normalize: must be true or false",
        ),
        (
            merged(merge={"method": "ties", "params": {"lambda": [{"filter": "mlp"}]}}),
            "study.yaml: merge.params: lambda[0]: expected {filter: NAME, value: NUMBER}",
        ),
        (
            merged(merge={"method": "ties", "params": {"density": [0.5, 1.5]}}),
            "study.yaml: merge.params: density: must be in (0, 1]",
        ),
        (
            merged(merge={"slices": [{"sources": []}]}),
            "study.yaml: merge.slices: layer slices cannot be searched",
        ),
        (
            merged(search={"n_trials": 0}),
            "study.yaml: search.n_trials: input should be greater than or equal to 1",
        ),
        (
            merged(search={"baselines": ["greedy"]}),
            "study.yaml: search.baselines: greedy is built from the single-checkpoint scores",
        ),
        (
            merged(search={"sampler": "cmaes", "objective": "pareto"}),
            "study.yaml: search.objective: cmaes optimises one value",
        ),
        (
            merged(search={"baselines": ["uniform", "uniform"]}),
            "study.yaml: search.baselines: a baseline is listed twice",
        ),
        (
            merged(search={"baselines": ["best"]}),
            "study.yaml: search.baselines.0: must be one of uniform, singles",
        ),
        (merged(objectives=[]), "study.yaml: objectives: list should have at least 1 item"),
        (
            merged(
                objectives=[
                    {"name": "a", "task": "t", "metric": "acc"},
                    {"name": "a", "task": "u", "metric": "acc"},
                ]
            ),
            "study.yaml: objectives: objective name 'a' is used twice",
        ),
        (
            merged(objectives=[{"name": "a", "task": "t"}]),
            "study.yaml: objectives.0.metric: required",
        ),
        (
            merged(objectives=[{"name": "a", "task": "t", "metric": "acc", "direction": "up"}]),
            "study.yaml: objectives.0.direction: must be one of maximize, minimize",
        ),
        (merged(storage="recycler.db"), "study.yaml: storage: must be an Optuna storage URL"),
        (
            merged(storage="sqlite:///:memory:"),
            "study.yaml: storage: an in-memory SQLite database would lose the study",
        ),
        (
            merged(storage="sqlite:///nowhere/x.db"),
            "study.yaml: storage: no such folder for the SQLite file",
        ),
        (merged(eval={"tasks_dir": "missing"}), "study.yaml: eval.tasks_dir: no such folder"),
        ({k: v for k, v in BASE.items() if k != "eval"}, "study.yaml: eval: required"),
        (
            merged(eval={"split": "test"}),
            "study.yaml: eval.split: the search must not optimise the test split",
        ),
        (
            merged(eval={"batch_size": 0}),
            "study.yaml: eval.batch_size: must be a positive integer or auto",
        ),
        (
            merged(eval={"dev_fraction": 1.5}),
            "study.yaml: eval.dev_fraction: input should be less than 1",
        ),
        (
            merged(eval={"dev_fraction": 0}),
            "study.yaml: eval.dev_fraction: input should be greater than 0",
        ),
        (
            merged(eval={"fewshot_as_multiturn": True}),
            "study.yaml: eval.fewshot_as_multiturn: needs apply_chat_template",
        ),
        (merged(eval={"datasets": {"gsm8k": 3}}), "study.yaml: eval.datasets.gsm8k"),
        (
            merged(objectives=[{"name": "a", "task": "t", "metric": "acc", "num_fewshot": -1}]),
            "study.yaml: objectives.0.num_fewshot: input should be greater than or equal to 0",
        ),
        (
            merged(
                objectives=[
                    {"name": "a", "task": "t", "metric": "acc", "num_fewshot": 5},
                    {"name": "b", "task": "t", "metric": "acc_norm"},
                ]
            ),
            "study.yaml: objectives.1.num_fewshot: task t is scored with num_fewshot 5 by "
            "another objective",
        ),
        (
            merged(cluster={"eval_workers": "two"}),
            "study.yaml: cluster.eval_workers: input should be a valid integer",
        ),
        (
            merged(pool={"base": None, "checkpoints": ["a"]}, merge={"method": "ties"}),
            "study.yaml: pool.base: required by merge.method ties",
        ),
        (
            merged(pool={"checkpoints": []}),
            "study.yaml: pool.checkpoints: list should have at least 1 item",
        ),
        ([1, 2], "study.yaml: the study file must be a YAML mapping of keys"),
        ("name: [unclosed\n", "study.yaml: YAML syntax error at line 2"),
    ],
)
def test_bad_study_files_name_the_key(tmp_path: Path, data: Any, expected: str) -> None:
    message = error_of(tmp_path, data)
    assert message.startswith(str(tmp_path)) and expected in message, message


def test_eval_keys_of_built_in_tasks(tmp_path: Path) -> None:
    """No eval.tasks_dir (lm-eval's tasks only) or several; local data resolved against the
    study folder."""
    (tmp_path / "mine").mkdir()
    spec = load_study_spec(
        write(
            tmp_path,
            merged(
                eval={
                    "tasks_dir": [".", "mine"],
                    "batch_size": "auto",
                    "apply_chat_template": True,
                    "datasets": {"gsm8k": "data/gsm8k", "cais/mmlu": {"test": "mmlu/test.parquet"}},
                }
            ),
        )
    )
    assert spec.task_dirs == [tmp_path.resolve(), tmp_path.resolve() / "mine"]
    request = suite_request(spec)
    assert request.include == (str(tmp_path.resolve()), str(tmp_path.resolve() / "mine"))
    assert request.datasets == {
        "gsm8k": str(tmp_path.resolve() / "data" / "gsm8k"),
        "cais/mmlu": {"test": [str(tmp_path.resolve() / "mmlu" / "test.parquet")]},
    }
    assert request.fewshot_as_multiturn is True and spec.eval.batch_size == "auto"
    spec = load_study_spec(write(tmp_path, {**BASE, "eval": {}}))
    assert spec.task_dirs == [] and suite_request(spec).include == ()
    assert (
        spec.eval.dev_fraction,
        spec.eval.split_seed,
        suite_request(spec).fewshot_as_multiturn,
    ) == (0.5, 0, False)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecyclerError, match="no such study file"):
        load_study_spec(tmp_path / "absent.yaml")


def test_the_old_name_of_baselines_is_read_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study_keys._noted.clear()
    for _ in range(2):
        spec = load_study_spec(write(tmp_path, merged(search={"seeds": ["uniform", "mwa"]})))
        assert spec.search.baselines == ["uniform", "mwa"]
        assert spec.search.enqueued_baselines == ["uniform", "mwa_loss", "mwa_step"]
    notes = [line for line in capsys.readouterr().err.splitlines() if "search.seeds" in line]
    assert notes == [
        "recycler: note: search.seeds is now called search.baselines; the study file still reads "
        "as before"
    ]
    message = error_of(tmp_path, merged(search={"seeds": ["uniform"], "baselines": ["singles"]}))
    assert "study.yaml: search.seeds: renamed to search.baselines, which is also given" in message


def test_a_written_study_reads_back_the_same(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    data = merged(
        eval={"tasks_dir": "tasks"},
        search={"tune": [{"lambda": [0.5, 2.0]}], "baselines": ["uniform"]},
        merge={"method": "task_arithmetic"},
    )
    spec = load_study_spec(write(tmp_path, data))
    copy = tmp_path / "copy" / "study.yaml"
    copy.parent.mkdir()
    (copy.parent / "tasks").mkdir()
    spec.write(copy, header="# a copy\n")
    assert copy.read_text().startswith("# a copy\n")
    again = load_study_spec(copy)
    assert again.model_dump() == spec.model_dump()
    assert set(yaml.safe_load(copy.read_text())) == set(
        data
    )  # only the keys given: defaults stay defaults


def test_relocated_study_reads_from_any_folder(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    (folder / "tasks").mkdir(parents=True)
    (tmp_path / "shared-tasks").mkdir()
    spec = load_study_spec(
        _write_in(
            folder,
            merged(
                pool={"base": "zoo/base", "checkpoints": ["zoo/checkpoints/*", "/abs/c"]},
                eval={"tasks_dir": "../shared-tasks"},
            ),
        )
    )
    moved = spec.relocated()
    root = folder.resolve()
    assert moved.pool.checkpoints == [str(root / "zoo" / "checkpoints" / "*"), "/abs/c"]
    assert moved.pool.base == root / "zoo" / "base"
    assert moved.storage == f"sqlite:///{root / 'recycler.db'}"
    assert moved.eval.tasks_dir == tmp_path.resolve() / "shared-tasks"
    inside = _write_in(folder, merged(eval={"tasks_dir": "tasks"}))
    assert load_study_spec(inside).relocated().eval.tasks_dir == Path(
        "tasks"
    )  # travels with the study file


def _write_in(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_fixed_params_take_gradients_under_filters(tmp_path: Path) -> None:
    """merge.params as a recipe's `parameters`: gradients under filters, kept as filter lists
    in the recipe a trial merges (and so in an exported recipe.yaml)."""
    lam = [{"filter": "mlp", "value": [1.0, 0.5]}, {"value": 1.2}]
    data = merged(
        pool={"base": "base", "checkpoints": ["a", "b"]},
        merge={"method": "task_arithmetic", "params": {"lambda": lam}},
    )
    spec = load_study_spec(write(tmp_path, data))
    assert spec.merge.params["lambda"] == lam
    recipe = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": dict(spec.merge.params),
        }
    )
    assert recipe.to_dict()["parameters"]["lambda"] == lam
    at = recipe.tensor_params
    assert at("model.layers.0.mlp.up_proj.weight", 2).lambda_ == 1.0
    assert at("model.layers.1.mlp.up_proj.weight", 2).lambda_ == 0.5
    assert at("model.layers.1.self_attn.q_proj.weight", 2).lambda_ == 1.2
