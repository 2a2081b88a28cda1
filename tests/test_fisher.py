"""`recycler fisher` and `merge_method: fisher` on real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_pool import load_state, make_pool, save_tokenizer

from recycler.cli import main


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = make_pool(tmp_path_factory.mktemp("fisher-pool"))
    for name in ("c0", "c1"):
        save_tokenizer(dirs[name])
    data = dirs["base"].parent / "texts.jsonl"
    data.write_text(
        "".join(json.dumps({"text": "abcdefghij"[i:] + "klmnop"[: i + 2]}) + "\n" for i in range(8))
    )
    dirs["data"] = data
    return dirs


def _recipe(pool: dict[str, Path], path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "fisher",
                "models": [{"model": str(pool["c0"])}, {"model": str(pool["c1"])}],
                "dtype": "float32",
            }
        )
    )
    return path


def test_fisher_is_estimated_then_weights_the_merge(
    pool: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(pool, tmp_path / "recipe.yaml")
    # Without the Fisher files the merge says what to run.
    assert main(["merge", str(recipe), str(tmp_path / "early")]) == 2
    assert "no fisher.safetensors for fisher merging; run `recycler fisher`" in (
        capsys.readouterr().err
    )
    for name in ("c0", "c1"):
        assert (
            main(["fisher", str(pool[name]), "--data", str(pool["data"]), "--n-examples", "8"]) == 0
        )
        assert (pool[name] / "fisher.safetensors").is_file()
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    merged, a, b = load_state(tmp_path / "out"), load_state(pool["c0"]), load_state(pool["c1"])
    for name, t in merged.items():
        lo = torch.minimum(a[name].float(), b[name].float())
        hi = torch.maximum(a[name].float(), b[name].float())
        # A Fisher-weighted mean lies between the two versions, entry by entry ...
        assert bool(((t >= lo - 1e-6) & (t <= hi + 1e-6)).all()), name
    # ... and is not the plain average everywhere.
    plain = {n: (a[n].float() + b[n].float()) / 2 for n in merged}
    assert any(not torch.allclose(merged[n], plain[n], atol=1e-6) for n in merged)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read"),
        ('{"txt": "x"}\n', "line 1: expected a JSON object with a 'text' field"),
        (
            '{"text": "abc"}\n{"prompt": "x"}\n',
            "line 2: expected a JSON object with a 'text' field, or 'prompt' and 'completion'",
        ),
        ("", "no examples"),
    ],
)
def test_bad_fisher_data_fails_cleanly(
    content: str | None,
    fragment: str,
    pool: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    assert main(["fisher", str(pool["c2"]), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recycler: error: ") and fragment in err and len(err.splitlines()) == 1
    assert not (pool["c2"] / "fisher.safetensors").exists()


def test_a_prompt_is_context_and_only_the_completion_is_scored(
    pool: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recycler.merge.fisher import Example, estimate_fisher, read_examples

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "abcdef", "completion": "ghij"}) + "\n")
    examples = read_examples(data, 10)
    assert examples == [Example("abcdef", "ghij")]
    got = estimate_fisher(pool["c0"], examples)

    # The same from transformers' own loss: labels -100 on the prompt, so only the
    # completion's tokens count; the squared gradient of its sum is the Fisher.
    tokenizer = AutoTokenizer.from_pretrained(pool["c0"])
    model = AutoModelForCausalLM.from_pretrained(pool["c0"], dtype=torch.float32)
    ids = tokenizer("abcdefghij", return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, :6] = -100
    loss = (
        model(input_ids=ids, labels=labels).loss * 4
    )  # the mean over the 4 completion tokens, as a sum
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(got[name], p.grad.square(), rtol=1e-4, atol=1e-12)

    # Scoring the prompt too gives another Fisher.
    whole = estimate_fisher(pool["c0"], [Example("", "abcdefghij")])
    assert any(not torch.allclose(whole[n], got[n]) for n in got)
