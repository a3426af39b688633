"""What `nativevl eval` (eval/runner.py) asks of an evaluation task, with the defaults of the toy tasks."""

from __future__ import annotations


class EvalTask:
    """A subclass gives `name`, `max_new_tokens`, `load(n, seed)` -> items, `prompt(item)` -> (messages,
    images), `score(prediction, item)` -> bool or a float in [0, 1], and `chance(items, seed)`."""

    default_n: int | None = 200  # questions asked without --n (None: every one)
    binary: bool = True  # right / wrong (what paired tests and Best-of-N picks need), not partial credit
    circular: bool = False  # several rows per question, scored together (group_records)
    # Best-of-N's majority vote groups samples by vote_key(prediction, item) when a task defines it, else
    # by their final answer
    vote_key = None

    def tile_cap(self, n_images: int) -> int:  # the toy tasks: trained and asked with one tile
        """Tiles per image of a question with `n_images` images."""
        return 1

    def load(self, n: int | None, seed: int) -> list:
        raise NotImplementedError

    def prompt(self, item) -> tuple[list[dict], list]:
        raise NotImplementedError

    def score(self, prediction: str, item) -> bool | float:
        raise NotImplementedError

    def chance(self, items: list, seed: int) -> float:
        """The accuracy of guessing, on these questions or on more of the same kind."""
        raise NotImplementedError
