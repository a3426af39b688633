"""Evaluation tasks: each has `name`, `max_new_tokens`, `load(n, seed)`, `prompt(item)`, `score(prediction, item)`."""

from nativevl.data.toyworld.tasks import FAMILIES
from nativevl.eval.tasks.toyworld import ToyWorldTask


def get_task(name: str):
    if name in FAMILIES:
        return ToyWorldTask(name)
    raise ValueError(f"unknown task {name!r}; known: {sorted(FAMILIES)}")


TASK_NAMES = tuple(FAMILIES)
