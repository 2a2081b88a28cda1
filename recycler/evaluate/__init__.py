"""Scoring merges: one resident HF model (`model.ResidentModel`) whose weights are replaced
in place, scored by lm-eval on cached task suites (`runner.evaluate_tasks`, `tasks`)."""
