"""The search: study file → search space → Optuna study → Pareto front, picks and exports.

space (params ⇄ weights ⇄ recipe), samplers, study (create/resume, stale trials, stored
records), baselines (uniform, singles, MWA, greedy soup), cache, run (the ask/tell loop
over an Evaluator), front (Pareto set, hypervolume, knee: pure functions), analysis,
show (`recycler front`), pick (`recycler export`), dashboard. Nothing here touches a tensor.
"""
