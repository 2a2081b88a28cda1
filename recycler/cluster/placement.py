"""Ray placement groups for the search's workers, and what a started actor says about itself.

`cluster.placement` other than `none` reserves one placement group for all the workers
of a search (one bundle per shard and evaluation worker) with that strategy:
`pack`/`strict_pack` keep the pool's shards next to the models they feed (the merged
tensors then move through one node's shared-memory object store, not the network),
`spread`/`strict_spread` put them on different nodes.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from recycler.errors import RecyclerError

PLACEMENTS = ("none", "pack", "strict_pack", "spread", "strict_spread")
# How long to wait for a placement group's resources before giving up: a cluster that
# autoscales may need minutes to add a node; one that cannot fit the group never will.
PLACEMENT_TIMEOUT_S = 600.0


def reserve(
    placement: str, n_bundles: int, bundle: dict[str, float], timeout_s: float
) -> PlacementGroup:
    """A ready placement group of `n_bundles` copies of `bundle` placed with strategy
    `placement` (one of PLACEMENTS but none), or a RecyclerError once `timeout_s` is up."""
    group = placement_group([dict(bundle) for _ in range(n_bundles)], strategy=placement.upper())
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        raise RecyclerError(
            f"cluster.placement: Ray could not place {n_bundles} worker(s) of {bundle} with "
            "strategy "
            f"{placement} within {timeout_s:g} s (the cluster has {have}, nodes: "
            f"{len(ray.nodes())})"
        )
    return group


def in_bundle(group: PlacementGroup | None, bundle_index: int) -> dict[str, Any]:
    """Actor options that put an actor in bundle `bundle_index` of `group` (none without a
    group)."""
    if group is None:
        return {}
    strategy = PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=bundle_index
    )
    return {"scheduling_strategy": strategy}


def actor_facts(**holds: Any) -> dict[str, Any]:
    """What an actor's `ready()` returns: its pid, where Ray placed it (its node and its
    placement group, None outside one), and `holds`, what it keeps resident."""
    context = ray.get_runtime_context()
    return {
        "pid": os.getpid(),
        **holds,
        "node_id": context.get_node_id(),
        "placement_group": context.get_placement_group_id(),
    }
