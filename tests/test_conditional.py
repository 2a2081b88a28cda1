"""Recipe parameter settings resolve per tensor as mergekit 0.1.5 resolves them.

Each case's value is computed by mergekit's own `evaluate_setting` in its venv (the
oracle) at mergekit's t for the tensor (i / (n − 1) over the layers, 0 outside them)
and by `recycler.merge.conditional.resolve` from the tensor's name.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from recycler.errors import RecyclerError
from recycler.merge.conditional import layer_position, parse, resolve, setting_to_yaml

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_PYTHON = (
    Path(os.environ.get("RECYCLER_MERGEKIT_VENV", ROOT / ".venv-mergekit")) / "bin" / "python"
)
T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0]}]
SETTINGS: list[Any] = [
    0.25,
    [0.0, 1.0],
    [1, 0.7, 0.1],
    [*T, {"value": 0.5}],
    T,  # unset where no filter matches
    {"filter": "mlp", "value": [0.2, 0.4, 0.9]},
    [{"filter": "*", "value": [3, 1]}],
]
NAMES = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    *(
        f"model.layers.{i}.{part}"
        for i in range(7)
        for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")
    ),
]
N_LAYERS = 7
ORACLE = """
import json, sys
from mergekit.config import ConditionalParameter, evaluate_setting
def setting(s):
    if isinstance(s, dict):
        return ConditionalParameter(**s)
    if isinstance(s, list) and s and isinstance(s[0], dict):
        return [ConditionalParameter(**e) for e in s]
    return s
out = []
for s, name, t in json.loads(sys.argv[1]):
    out.append(evaluate_setting(name, setting(s), t, validate=float))
print(json.dumps(out))
"""


def test_resolution_matches_mergekit() -> None:
    if not MERGEKIT_PYTHON.is_file():
        pytest.skip(f"mergekit venv not found at {MERGEKIT_PYTHON}")
    cases = [(s, n, layer_position(n, N_LAYERS)) for s in SETTINGS for n in NAMES]
    done = subprocess.run(
        [str(MERGEKIT_PYTHON), "-c", ORACLE, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    expected = json.loads(done.stdout.strip().splitlines()[-1])
    for (s, name, t), want in zip(cases, expected):
        got = resolve(parse(s, "t"), name, N_LAYERS)
        assert got == want, f"{s} at {name} (t={t}): recycler {got}, mergekit {want}"


def test_slice_positions_count_from_the_slice() -> None:
    assert layer_position("model.layers.12.mlp.up_proj.weight", 5, first_layer=10) == 0.5
    assert layer_position("model.layers.3.mlp.up_proj.weight", 1, first_layer=3) == 1.0
    assert layer_position("lm_head.weight", 5, first_layer=10) == 0.0


def test_settings_write_back_as_read() -> None:
    for s in SETTINGS:
        written = setting_to_yaml(parse(s, "t"))
        assert parse(written, "t") == parse(s, "t")
    assert setting_to_yaml(parse([{"filter": "mlp", "value": True}], "n", "bool")) == [
        {"filter": "mlp", "value": True}
    ]


@pytest.mark.parametrize(
    ("value", "kind", "message"),
    [
        (
            [{"filter": "mlp", "value": [0.1, "x"]}],
            "float",
            "t[0].value: a layer gradient takes NUMBER values only, got 'x'",
        ),
        (
            [{"filter": "mlp"}],
            "float",
            "t[0]: expected {filter: NAME, value: NUMBER}, got {'filter': 'mlp'}",
        ),
        ([{"filter": 3, "value": 1}], "float", "t[0].filter: must be text, got 3"),
        ([1, 0], "bool", "t: a layer gradient takes true/false values only, got 1"),
        (2.5, "int", "t: must be an integer, got 2.5"),
        ([], "float", "t: not a number: []"),
    ],
)
def test_bad_settings_name_the_key(value: Any, kind: str, message: str) -> None:
    with pytest.raises(RecyclerError) as info:
        parse(value, "t", kind)
    assert str(info.value) == message
