"""Before a search: one dev document of every objective's task scored with one checkpoint,
through the evaluator the trials use.

A task or eval option that makes every evaluation fail (a generation longer than the
model's context, a dataset the workers cannot load) then fails in seconds, with one error
naming the objectives and lm-eval's cause, instead of failing every trial.
"""

from __future__ import annotations

from recycler.errors import RecyclerError
from recycler.evaluate.evaluator import Evaluator
from recycler.merge.recipe import Recipe
from recycler.search.prepare import Prepared

# Apart from the driver's tickets (0, 1, ...): the check runs before any trial.
TICKET = -1


def one_checkpoint_recipe(prepared: Prepared) -> tuple[str, Recipe] | None:
    """(checkpoint name, recipe) of the study's method on its first checkpoint alone, as
    its `single:` baseline is (the uniform soup where that is outside the space); None
    when neither is a point of the space."""
    space = prepared.space
    n = space.n
    for weights, name in (
        ([1.0] + [0.0] * (n - 1), f"checkpoint {space.names[0]}"),
        ([1.0 / n] * n, "the uniform soup"),
    ):
        params = space.encode(weights)
        if params is None:
            continue
        stored = space.recipe_dict(space.decode(params))
        try:
            return name, Recipe.from_dict(stored, where="the check before the search")
        except RecyclerError:
            continue  # a recipe the method refuses is a trial's failure, not the tasks'
    return None


def preflight(prepared: Prepared, evaluator: Evaluator) -> None:
    """Score the first dev document (of the first rung) of every task; RecyclerError
    naming the objectives and the cause when that fails."""
    chosen = one_checkpoint_recipe(prepared)
    if chosen is None:
        return
    name, recipe = chosen
    docs = {task: ids[:1] for task, ids in prepared.rungs.docs[0].items()}
    evaluator.submit(TICKET, recipe, prepared.spec.eval.split, docs)
    results = dict(evaluator.wait())
    result = results[TICKET]
    if result.ok:
        return
    objectives = prepared.objectives
    if len(objectives) == 1:
        where = f"objectives.0.task: task {objectives[0].task}"
    else:
        where = "objectives: tasks " + ", ".join(f"{o.task} ({o.name})" for o in objectives)
    raise RecyclerError(
        f"{where}: scoring one document of each with {name} failed before the search "
        f"started: {result.error or 'no reason given'}"
    )
