"""Toy-world task families as evaluation tasks (held-out seeds, verified answers)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from nativevl.data.toyworld.tasks import Example, example, final_answer, normalize, verify
from nativevl.eval.tasks.base import EvalTask


@dataclass(frozen=True)
class ToyWorldTask(EvalTask):
    name: str
    size: int = 96

    @property
    def max_new_tokens(self) -> int:
        return 64 if self.name == "arithmetic" else 12

    def load(self, n: int, seed: int) -> list[Example]:
        return [example(self.name, seed, i, self.size) for i in range(n)]

    def prompt(self, item: Example) -> tuple[list[dict[str, str]], list]:
        return [{"role": "user", "content": item.question}], item.images

    def score(self, prediction: str, item: Example) -> bool:
        return verify(self.name, prediction, item.answer)

    def vote_key(self, prediction: str, item: Example) -> str | None:
        """Best-of-N's vote: what `verify` compares. Arithmetic's final answer (a sample with none, cut
        short or rambling, has no vote: two such out-voted the readable answers), else the whole text."""
        return final_answer(prediction) if self.name == "arithmetic" else (normalize(prediction) or None)

    def answer_key(self, item: Example) -> str:
        """What chance is measured on: the answer a constant guesser would have to hit. For multi-image
        that is the picture's number (the colour before it only restates the question)."""
        if self.name == "arithmetic":
            return final_answer(item.answer) or ""
        if self.name == "multi_image":
            return normalize(item.answer).split()[-1]
        return normalize(item.answer)

    def chance(self, items: list[Example], seed: int) -> float:  # measured on more questions than asked
        """chance_level on 2,000 generated questions of the evaluation's seed."""
        return chance_level(self, seed)


def chance_level(task: ToyWorldTask, seed: int, n: int = 2000) -> float:
    """Accuracy of always giving the most frequent answer of each question kind, measured on `n`
    generated questions (more than an evaluation holds, so that the estimate is not inflated)."""
    items = task.load(n, seed)
    by_kind: defaultdict[str, Counter] = defaultdict(Counter)
    for item in items:
        by_kind[item.kind][task.answer_key(item)] += 1
    return sum(c.most_common(1)[0][1] for c in by_kind.values()) / max(1, len(items))
