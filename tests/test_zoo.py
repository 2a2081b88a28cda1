"""The demo pool: its skills, its files as real libraries read them, its build bookkeeping."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from recycler.errors import RecyclerError
from recycler.zoo import build as zoo_build
from recycler.zoo.skills import HELD_OUT, SKILLS, TrainStream, draw, eval_sets
from recycler.zoo.spec import MICRO, SIZES
from recycler.zoo.tasks import GROUP, task_name
from recycler.zoo.tokenizer import encode, vocab

# --- skills ---------------------------------------------------------------------------


def _word(prompt: str) -> str:
    return prompt.split(":", 1)[1].rstrip("=")


ANSWERS = {
    "inc": lambda w: "".join(str((int(c) + 1) % 10) for c in w),
    "dec": lambda w: "".join(str((int(c) - 1) % 10) for c in w),
    "rev": lambda w: w[::-1],
    "rot": lambda w: w[1:] + w[0],
    "sort": lambda w: "".join(sorted(w)),
}


@pytest.mark.parametrize("skill", list(SKILLS))
def test_gold_choice_is_the_skills_answer_and_distractors_differ(skill: str) -> None:
    rng = random.Random(0)
    for _ in range(200):
        ex = draw(skill, rng)
        assert ex.answer == ANSWERS[skill](_word(ex.prompt))
        assert len(set(ex.choices)) == 4
        # Same length: summed log-likelihoods compare like with like.
        assert {len(c) for c in ex.choices} == {len(ex.answer)}


def test_eval_splits_are_seeded_disjoint_and_never_trained_on() -> None:
    a, b = eval_sets(0, 30), eval_sets(0, 30)
    assert a == b
    assert eval_sets(1, 30) != a
    exclude = set()
    for skill, splits in a.items():
        dev = {e.prompt for e in splits["dev"]}
        test = {e.prompt for e in splits["test"]}
        assert len(dev) == len(test) == 30 and not dev & test, skill
        exclude |= dev | test
    pairs = TrainStream({s: 1.0 for s in SKILLS}, exclude, "t").take(3000)
    assert not {p for p, _ in pairs} & exclude


def test_eval_data_do_not_depend_on_the_process_hash_seed() -> None:
    """Same seed, same questions in every process (set iteration order varies with PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    code = "from recycler.zoo.skills import eval_sets; print(repr(eval_sets(0, 100)))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(h)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in (1, 2, 3)
    }
    assert len(outs) == 1


def test_held_out_skill_is_in_no_fine_tuning_run() -> None:
    for spec in SIZES.values():
        assert spec.pretrain_mixture.get(HELD_OUT, 0) > 0
        for run in [*spec.runs, spec.lora]:
            assert run.mixture.get(HELD_OUT, 0) == 0, run.name


def test_training_is_deterministic() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from recycler.zoo.train import Schedule, train

    table = vocab()

    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=len(table),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
        model = LlamaForCausalLM(cfg)
        train(
            model,
            TrainStream({"rev": 1.0}, set(), seed),
            table,
            Schedule(steps=5, lr=1e-3, batch_size=8),
        )
        return model.state_dict()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# --- the built micro pool, read by the libraries real pools come from -------------------


def test_base_and_tokenizer_load_with_auto_classes(micro_zoo: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_zoo / "base")
    text = "R:abcd=dcba"
    assert tok.encode(text) == encode(text, vocab())
    assert tok.decode(tok.encode(text)) == text
    model = AutoModelForCausalLM.from_pretrained(micro_zoo / "base")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_checkpoints_are_varied_like_a_real_pool(micro_zoo: Path) -> None:
    from transformers import AutoModelForCausalLM

    dirs = sorted((micro_zoo / "checkpoints").iterdir())
    assert len(dirs) >= 4
    assert len({d.name.rsplit("-step", 1)[0] for d in dirs}) >= 3
    sharded = [(d / "model.safetensors.index.json").is_file() for d in dirs]
    assert any(sharded) and not all(sharded)
    dtypes = set()
    for d in dirs:
        state = json.loads((d / "trainer_state.json").read_text())
        assert state["global_step"] == int(d.name.rsplit("-step", 1)[1])
        assert [h["loss"] for h in state["log_history"] if "loss" in h]
        model = AutoModelForCausalLM.from_pretrained(d)
        dtypes.add(next(model.parameters()).dtype)
    assert len(dtypes) >= 2


def test_adapters_load_with_peft_and_change_the_base(micro_zoo: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = sorted((micro_zoo / "adapters").iterdir())
    assert len(dirs) >= 3
    ids = torch.tensor([encode("R:abcd=", vocab())])
    plain = AutoModelForCausalLM.from_pretrained(micro_zoo / "base")
    ref = plain(ids).logits
    for d in dirs:
        assert json.loads((d / "trainer_state.json").read_text())["log_history"][-1]["loss"] > 0
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(micro_zoo / "base"), d
        )
        assert not torch.allclose(model(ids).logits, ref)


def test_tasks_study_and_scores_cover_the_pool(micro_zoo: Path) -> None:
    from recycler.config import load_study_spec

    tasks = micro_zoo / "tasks"
    assert len(SKILLS) >= 4 + 1  # four emphasised skills and one held out
    for skill in SKILLS:
        assert (tasks / f"{task_name(skill)}.yaml").is_file()
    assert (tasks / f"{GROUP}.yaml").is_file()

    spec = load_study_spec(micro_zoo / "study.yaml")
    assert spec.tasks_dir.resolve() == tasks.resolve()
    assert {o.task for o in spec.objectives} == {task_name(s) for s in SKILLS}

    scores = json.loads((micro_zoo / "scores.json").read_text())
    names = set(scores["models"])
    expected = {"base", "uniform_soup"} | {d.name for d in (micro_zoo / "checkpoints").iterdir()}
    expected |= {d.name for d in (micro_zoo / "adapters").iterdir()}
    assert names == expected
    for name, m in scores["models"].items():
        for split in ("dev", "test"):
            accs = [m[split][task_name(s)]["acc"] for s in SKILLS]
            assert all(0.0 <= a <= 1.0 for a in accs), name
    # The runs did learn something: some checkpoint beats the base on some skill.
    base = scores["models"]["base"]["dev"]
    assert any(
        m["dev"][t]["acc"] > base[t]["acc"] + 0.1
        for m in scores["models"].values()
        if m["kind"] == "checkpoint"
        for t in base
        if t != GROUP
    )


def test_a_complete_zoo_is_reused_not_rebuilt(micro_zoo: Path) -> None:
    marker = micro_zoo / zoo_build.MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert zoo_build.build_zoo(micro_zoo, size="micro", seed=0, quiet=True) == micro_zoo
    assert time.perf_counter() - start < 5
    assert marker.stat().st_mtime_ns == before


# --- build bookkeeping, without training --------------------------------------------------

WANT = {"size": "micro", "seed": 0, "version": zoo_build.BUILD_VERSION}


def test_prepare_clears_an_interrupted_build(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"half")
    (tmp_path / zoo_build.MARKER).write_text(
        json.dumps(WANT)
    )  # left over, but the flag says unfinished
    (tmp_path / zoo_build.BUILDING).write_text("")
    assert zoo_build.prepare(tmp_path, WANT) is False
    assert not (tmp_path / "base").exists() and not (tmp_path / zoo_build.MARKER).exists()


def test_prepare_reuses_a_complete_zoo_and_refuses_others(tmp_path: Path) -> None:
    (tmp_path / zoo_build.MARKER).write_text(json.dumps(WANT))
    (tmp_path / "base").mkdir()
    assert zoo_build.prepare(tmp_path, WANT) is True
    assert (tmp_path / "base").exists()
    with pytest.raises(RecyclerError, match="seed=0"):
        zoo_build.prepare(tmp_path, {**WANT, "seed": 1})


def test_prepare_refuses_a_folder_that_is_not_a_zoo(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RecyclerError, match=r"notes\.txt"):
        zoo_build.prepare(tmp_path, WANT)
    assert (tmp_path / "notes.txt").exists()


def test_bad_arguments_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(RecyclerError, match="micro, small"):
        zoo_build.build_zoo(tmp_path / "z", size="huge")
    with pytest.raises(RecyclerError, match="seed"):
        zoo_build.build_zoo(tmp_path / "z", size="micro", seed=-1)
    (tmp_path / "file").write_text("")
    with pytest.raises(RecyclerError, match="not a directory"):
        zoo_build.build_zoo(tmp_path / "file", size="micro")


def test_micro_spec_meets_the_issue_minimums() -> None:
    assert MICRO.n_checkpoints >= 4 and len(MICRO.runs) >= 3 and len(MICRO.lora.save_steps) >= 3
    small = SIZES["small"]
    assert small.n_checkpoints >= 8 and len(small.runs) >= 3 and len(small.lora.save_steps) >= 3
