"""recycler: search the weights of a merge of checkpoints, keep the Pareto front, ship one model."""

__version__ = "0.1.0"
