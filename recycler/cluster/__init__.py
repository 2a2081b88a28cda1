"""Ray: the workers that keep the pool and a model resident and evaluate recipes for the
search (worker, shard_worker, evaluator), and a study's search as a Ray job (job_plan
plans it without Ray, jobs sends and follows it)."""
