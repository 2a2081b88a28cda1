"""ray_configs/: the launcher YAML against the schema inside the ray package, the RayJob manifest parsed."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "ray_configs"
GPU_INSTANCE = re.compile(r"^(p4d|p4de|p5|p5e|p5en|g5|g6|g6e)\.")


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def check_launcher_config(config: Any) -> None:
    """The schema, then the cross-field checks Ray's own (private) validate_config adds."""
    schema = ray_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(config)
    types = config["available_node_types"]
    if config["head_node_type"] not in types:
        raise ValueError("head_node_type must be one of available_node_types")
    if sum(t.get("min_workers", 0) for t in types.values()) > config["max_workers"]:
        raise ValueError("max_workers is smaller than the sum of min_workers")


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((CONFIGS / "gpu-cluster.yaml").read_text())
    return config


def test_launcher_config_validates_against_rays_schema(launcher: dict[str, Any]) -> None:
    check_launcher_config(launcher)


def test_launcher_config_passes_rays_own_preparation(launcher: dict[str, Any]) -> None:
    """What `ray up` does first: merge the provider's defaults, then validate. Private API
    (pinned ray 2.60): skipped, not failed, if it moves."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        pytest.skip("ray.autoscaler._private.util moved")
    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: c.update(max_workrs=3),  # a misspelt top-level key
        lambda c: c["available_node_types"]["gpu"].update(min_workers="3"),  # wrong type
        lambda c: c["available_node_types"]["gpu"].pop("node_config"),  # required key
        lambda c: c.update(head_node_type="nope"),
        lambda c: c.update(max_workers=1),  # fewer than the GPU group's min_workers
    ],
)
def test_the_validation_catches_broken_configs(launcher: dict[str, Any], damage: Any) -> None:
    broken = copy.deepcopy(launcher)
    damage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        check_launcher_config(broken)


def test_launcher_config_is_a_token_auth_gpu_cluster_with_recycler(
    launcher: dict[str, Any],
) -> None:
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    gpu = [t for t in workers if GPU_INSTANCE.match(t["node_config"]["InstanceType"])]
    assert gpu, "no GPU worker group"
    assert all(t.get("min_workers", 0) >= 1 for t in gpu)
    assert head["resources"].get("CPU") == 0  # nothing but the driver on the head

    setup = "\n".join(launcher["setup_commands"])
    assert re.search(r"pip install .*recycler", setup), setup
    assert "RAY_AUTH_MODE=token" in setup  # interactive shells on the nodes
    head_start = " ".join(launcher["head_start_ray_commands"])
    worker_start = " ".join(launcher["worker_start_ray_commands"])
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start and "ray start" in start
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (ssh)
    # The token Ray reads on every node, copied from the launching machine.
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # An object store large enough for a 200 GB merged model (README.md's sizing).
    store = re.search(r"--object-store-memory=(\d+)", worker_start)
    assert store is not None and int(store.group(1)) >= 400 * 10**9


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((CONFIGS / "rayjob.yaml").read_text()) if d is not None]
    assert len(docs) == 1
    doc: dict[str, Any] = docs[0]
    return doc


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = group["template"]["spec"]["containers"]
    return found


def test_rayjob_runs_recycler_search_on_a_mounted_study(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["recycler", "search"]
    study = Path(entry[2])
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    assert head and groups
    # The driver runs in the head pod: the study's folder must be mounted there.
    mounts = [Path(m["mountPath"]) for m in containers(head)[0]["volumeMounts"]]
    assert any(study.is_relative_to(m) for m in mounts), (study, mounts)
    volumes = {v["name"] for v in head["template"]["spec"]["volumes"]}
    assert {m["name"] for m in containers(head)[0]["volumeMounts"]} <= volumes


def test_rayjob_cluster_is_token_authenticated_with_gpu_workers(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "token auth needs Ray >= 2.52"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        # KubeRay's rayStartParams is map[string]string: a bare number is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group[
            "rayStartParams"
        ]
        for c in containers(group):
            assert c["name"] and c["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = containers(group)[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"  # backs Ray's object store
