"""The evaluator: one resident model, weights copied in place, scored by real lm-eval runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from recycler.errors import RecyclerError
from recycler.evaluate.model import ResidentModel
from recycler.evaluate.results import parse_results
from recycler.evaluate.runner import evaluate_tasks
from recycler.evaluate.tasks import folder_request, load_suite, metric_info
from recycler.zoo.checkpoints import read_full
from recycler.zoo.skills import SKILLS
from recycler.zoo.tasks import GROUP, task_name

TASKS = [task_name(s) for s in SKILLS]


@pytest.fixture(scope="module")
def scores(micro_zoo: Path) -> dict:
    return json.loads((micro_zoo / "scores.json").read_text())


@pytest.fixture()
def rm(micro_zoo: Path) -> ResidentModel:
    return ResidentModel(micro_zoo / "base", dtype=torch.float32)


def _checkpoint(micro_zoo: Path, index: int = 0) -> Path:
    return sorted((micro_zoo / "checkpoints").iterdir())[index]


def test_scores_follow_the_weights_loaded_in_place(
    micro_zoo: Path, rm: ResidentModel, scores: dict
) -> None:
    model, lm = rm.model, rm.lm(64)
    for d in sorted((micro_zoo / "checkpoints").iterdir())[:2]:
        rm.load_tensors(read_full(d))
        got = evaluate_tasks(rm, folder_request(micro_zoo / "tasks", [GROUP]), "dev", batch_size=64)
        want = scores["models"][d.name]["dev"]
        assert {t: got[t]["acc"] for t in TASKS} == {t: want[t]["acc"] for t in TASKS}, d.name
    # The same objects throughout: nothing was reloaded.
    assert rm.model is model and rm.lm(64) is lm and lm.model is model


def test_split_override_scores_dev_and_test(
    micro_zoo: Path, rm: ResidentModel, scores: dict
) -> None:
    dev = evaluate_tasks(rm, folder_request(micro_zoo / "tasks", TASKS), "dev")
    test = evaluate_tasks(rm, folder_request(micro_zoo / "tasks", TASKS), "test")
    base = scores["models"]["base"]
    assert {t: dev[t]["acc"] for t in TASKS} == {t: base["dev"][t]["acc"] for t in TASKS}
    assert {t: test[t]["acc"] for t in TASKS} == {t: base["test"][t]["acc"] for t in TASKS}
    assert dev != test
    with pytest.raises(RecyclerError, match="no split 'train'"):
        evaluate_tasks(rm, folder_request(micro_zoo / "tasks", TASKS), "train")


def test_matches_lm_eval_loading_the_checkpoint_itself(micro_zoo: Path, scores: dict) -> None:
    """lm-eval's own path (model loaded from disk by name) agrees with the resident model."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    d = _checkpoint(micro_zoo, 1)
    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(d), "dtype": "float32"},
        tasks=[task_name("rev"), task_name("inc")],
        task_manager=TaskManager(include_path=str(micro_zoo / "tasks"), include_defaults=False),
        device="cpu",
        batch_size=64,
        bootstrap_iters=0,
    )
    assert out is not None
    got = parse_results(out["results"])  # lm-eval scores test_split, i.e. test
    for t in (task_name("rev"), task_name("inc")):
        assert got[t]["acc"] == scores["models"][d.name]["test"][t]["acc"]


def test_limit_scores_the_first_questions(micro_zoo: Path, rm: ResidentModel) -> None:
    got = evaluate_tasks(
        rm, folder_request(micro_zoo / "tasks", [task_name("inc")]), "dev", limit=5
    )
    assert got[task_name("inc")]["acc"] * 5 == pytest.approx(
        round(got[task_name("inc")]["acc"] * 5)
    )
    with pytest.raises(RecyclerError, match="limit"):
        evaluate_tasks(rm, folder_request(micro_zoo / "tasks", [task_name("inc")]), "dev", limit=0)


def test_load_tensors_checks_before_copying(micro_zoo: Path, rm: ResidentModel) -> None:
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    good = read_full(_checkpoint(micro_zoo))
    name = next(iter(good))
    bad_shape = {**good, name: torch.zeros(3, 3)}
    with pytest.raises(RecyclerError, match="shape"):
        rm.load_tensors(bad_shape)
    with pytest.raises(RecyclerError, match="not a tensor"):
        rm.load_tensors({**good, "model.layers.99.mlp.up_proj.weight": torch.zeros(1)})
    partial = dict(list(good.items())[:3])
    with pytest.raises(RecyclerError, match="missing tensors"):
        rm.load_tensors(partial)
    # Nothing was written by the refused calls.
    assert all(torch.equal(before[k], v) for k, v in rm.state_dict().items())
    rm.load_tensors(partial, strict=False)
    after = rm.state_dict()
    assert all(torch.equal(after[k], partial[k].float()) for k in partial)


def test_tied_lm_head_is_written_through_the_embedding(rm: ResidentModel) -> None:
    assert "lm_head.weight" not in rm.tensor_names
    embed = rm.model.get_input_embeddings().weight
    new = torch.randn_like(embed)
    rm.load_tensors({"lm_head.weight": new}, strict=False)
    assert torch.equal(embed, new) and torch.equal(rm.model.get_output_embeddings().weight, new)
    # Given both, the embedding's own value wins.
    other = torch.randn_like(embed)
    rm.load_tensors({"model.embed_tokens.weight": other, "lm_head.weight": new}, strict=False)
    assert torch.equal(embed, other)


def test_lower_precision_weights_are_cast_into_the_resident_dtype(
    micro_zoo: Path, rm: ResidentModel
) -> None:
    state = {k: v.to(torch.bfloat16) for k, v in read_full(micro_zoo / "base").items()}
    rm.load_tensors(state)
    assert all(v.dtype == torch.float32 for v in rm.state_dict().values())


def test_metric_directions_come_from_the_task_configs(micro_zoo: Path) -> None:
    info = metric_info(folder_request(micro_zoo / "tasks", [GROUP]))
    assert info[GROUP].directions == {"acc": True} and info[GROUP].filters == ("none",)
    assert all(info[t].directions == {"acc": True} for t in TASKS)


def test_task_suites_are_cached_until_the_folder_changes(micro_zoo: Path, tmp_path: Path) -> None:
    import shutil

    assert load_suite(folder_request(micro_zoo / "tasks", [GROUP])) is load_suite(
        folder_request(micro_zoo / "tasks", [GROUP])
    )
    tasks = tmp_path / "tasks"
    shutil.copytree(micro_zoo / "tasks", tasks)
    first = load_suite(folder_request(tasks, [GROUP]))
    data = tasks / "data" / "inc.dev.jsonl"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert load_suite(folder_request(tasks, [GROUP])) is not first


def test_a_named_task_inside_a_named_group_is_scored_once(
    micro_zoo: Path, rm: ResidentModel
) -> None:
    got = evaluate_tasks(rm, folder_request(micro_zoo / "tasks", [GROUP, task_name("rev")]), "dev")
    assert set(got) == {GROUP, *TASKS}


def test_bad_task_inputs_are_input_errors(
    micro_zoo: Path, rm: ResidentModel, tmp_path: Path
) -> None:
    with pytest.raises(RecyclerError, match="unknown lm-eval task, group or tag 'zoo_nope'"):
        evaluate_tasks(rm, folder_request(micro_zoo / "tasks", ["zoo_nope"]), "dev")
    with pytest.raises(RecyclerError, match="not a directory"):
        evaluate_tasks(rm, folder_request(tmp_path / "missing", [GROUP]), "dev")
    with pytest.raises(RecyclerError, match=r"no config\.json"):
        ResidentModel(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_model_on_cuda_scores_like_the_cpu(
    micro_zoo: Path, scores: dict, dtype: torch.dtype
) -> None:
    rm = ResidentModel(micro_zoo / "base", device="cuda", dtype=dtype)
    d = _checkpoint(micro_zoo, 1)
    rm.load_tensors(read_full(d))  # CPU tensors of the file's dtype, copied onto the GPU
    assert all(t.device.type == "cuda" and t.dtype == dtype for t in rm.state_dict().values())
    assert rm.lm(64).device.type == "cuda"
    got = evaluate_tasks(rm, folder_request(micro_zoo / "tasks", [GROUP]), "dev", batch_size=64)
    want = scores["models"][d.name]["dev"]
    for t in TASKS:
        # Other kernels (and bf16 rounding) flip an answer only on a near tie.
        assert got[t]["acc"] == pytest.approx(want[t]["acc"], abs=0.1), t


def test_parse_results_drops_stderr_alias_and_keeps_filters() -> None:
    raw = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strict": 1}}
    assert parse_results(raw) == {"t": {"acc": 0.5, "exact_match,strict": 1.0}}
