"""The search: study file → search space → Optuna study → Pareto front.

space (params ⇄ weights ⇄ recipe), study (create/resume, stale trials),
stored (every key a study keeps in Optuna: its writer and its reader), baselines
(uniform, singles, MWA, greedy soup), cache, run (the ask/tell driver over an
Evaluator), front (Pareto set, hypervolume, knee: pure functions), analysis (a stored
study summarised). Nothing here touches a tensor, a worker or a terminal.
"""
