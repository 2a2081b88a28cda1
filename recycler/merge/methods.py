"""`METHODS`: every merge method's description (`description.MethodDescription`), by name.

Each description stands beside its function, in the module of its kind of method (as
mergekit registers a method where it is defined): weighted sums (`linear`), the TIES
family (`ties_family`), the methods that read angles and norms (`geometric`), those that
choose per entry which models count (`selection`). This module only collects them, in
that order (the order of the README's method table and of every "known:" list).

No PyTorch at import: recipe checks and file-to-file merges read the registry without it.
"""

from __future__ import annotations

from recycler.merge.description import MethodDescription
from recycler.merge.geometric import DESCRIPTIONS as GEOMETRIC
from recycler.merge.linear import DESCRIPTIONS as LINEAR
from recycler.merge.selection import DESCRIPTIONS as SELECTION
from recycler.merge.ties_family import DESCRIPTIONS as TIES_FAMILY


def _registry(*groups: tuple[MethodDescription, ...]) -> dict[str, MethodDescription]:
    registry: dict[str, MethodDescription] = {}
    for method in (m for group in groups for m in group):
        assert method.name not in registry, f"two methods named {method.name}"
        registry[method.name] = method
    return registry


METHODS: dict[str, MethodDescription] = _registry(LINEAR, TIES_FAMILY, GEOMETRIC, SELECTION)
