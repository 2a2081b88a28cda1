"""Merging checkpoints by a mergekit recipe: what the rest of recycler uses of it.

- `Recipe`, `ModelSpec`, `DTYPES`: a recipe (mergekit's YAML) read, checked and written.
- `METHODS`, `MethodDescription`: every merge method's description, by name (each
  stands beside its function in `linear`, `ties_family`, `geometric`, `selection`).
- `merge_state_dict`, `iter_merged`, `FileMerger`, `FileJob`, `MergeStats`: a pool merged
  by a recipe, in memory or file to file (`engine`).
- `mwa_weights`, `uniform_weights`, `MwaMetric`: weight schemes (`weights`).

Importing this package imports no PyTorch (a linear merge runs file to file without it).
Two modules import it at their top and are imported by name, not from here:
`merge.resident` (a search's pieces kept in memory, merged per recipe) and
`merge.fisher` (Fisher estimates).
"""

from recycler.merge.description import MethodDescription
from recycler.merge.engine import FileJob, FileMerger, MergeStats, iter_merged, merge_state_dict
from recycler.merge.methods import METHODS
from recycler.merge.recipe import DTYPES, ModelSpec, Recipe
from recycler.merge.weights import MwaMetric, mwa_weights, uniform_weights

__all__ = [
    "DTYPES",
    "METHODS",
    "FileJob",
    "FileMerger",
    "MergeStats",
    "MethodDescription",
    "ModelSpec",
    "MwaMetric",
    "Recipe",
    "iter_merged",
    "merge_state_dict",
    "mwa_weights",
    "uniform_weights",
]
