"""Ray: the workers that keep the pool and a model resident and evaluate recipes for the search
(worker, evaluator), and the search as a Ray job (jobs)."""
