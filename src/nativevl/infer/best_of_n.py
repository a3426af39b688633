"""Best-of-N: N sampled candidates from one shared prefill, a scorer, the best one.

Scorers: the PRM (mean P('+') over steps, VisualPRM's choice), an outcome score (the PRM's P('+')
at the last step alone: how it judges the finished solution), and majority vote over final answers
(self-consistency), which needs no reward model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from nativevl.data.positions import image_spans
from nativevl.data.toyworld.tasks import final_answer, normalize
from nativevl.infer.engine import Completion, Engine, SamplingParams
from nativevl.infer.prm import step_scores

SCORERS = ("prm", "outcome", "majority")


@dataclass
class Candidates:
    texts: list[str]
    step_scores: list[list[float]] | None = None  # from the PRM, when one was given
    vote_key: Callable[[str], Hashable] | None = None  # what the vote groups by (a task's reading of an answer)

    def answer(self, i: int) -> Hashable | None:
        """The candidate's answer for voting: `vote_key` of its text when given (e.g. the option letter of
        a multiple-choice answer), else its final answer, else its whole normalised text, kept apart (as
        the toy verifier does: 'Final answer: 4' and a bare '4' are not the same answer); None for none."""
        if self.vote_key is not None:
            return self.vote_key(self.texts[i])
        found = final_answer(self.texts[i])
        if found is not None:
            return True, found
        return (False, normalize(self.texts[i])) if normalize(self.texts[i]) else None

    def pick(self, scorer: str) -> int:
        """Index of the chosen candidate (ties: the earliest). The majority vote counts readable answers
        only (`answer` None: an empty or unread sample has no vote), unless no sample has one."""
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if scorer == "majority":
            answers = [self.answer(i) for i in range(len(self.texts))]
            votes = Counter(a for a in answers if a is not None)
            if not votes:
                return 0
            top = max(votes.values())
            return next(i for i, a in enumerate(answers) if a is not None and votes[a] == top)
        if self.step_scores is None:
            raise ValueError(f"the {scorer!r} scorer needs a PRM")
        score = [sum(s) / len(s) if scorer == "prm" else s[-1] for s in self.step_scores]
        return max(range(len(score)), key=lambda i: (score[i], -i))


def sample_candidates(engine: Engine, input_ids: list[list[int]], pixel_values: list[torch.Tensor | None], *, n: int = 8,
                      temperature: float = 0.7, top_k: int = 0, max_tokens: int = 256, seed: int = 0,
                      image_keys: list | None = None, tiles_per_image: list | None = None) -> list[list[str]]:
    """n samples per prompt; the engine prefills each prompt once and clones its cache n times (its images
    from the vision cache when `image_keys` name them, as `Engine.generate` takes them)."""
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, n=n, seed=seed + i)
              for i in range(len(input_ids))]
    results: list[list[Completion]] = engine.generate(input_ids, params, pixel_values, image_keys, tiles_per_image)
    return [[c.text for c in r] for r in results]


def tiles_in_prompt(input_ids: list[int], image_token_id: int, image_seq_length: int) -> list[int]:
    """Tiles of each image of a tokenised prompt: each image is one run of image tokens
    (`<img>` IMG_CONTEXT... `</img>`), image_seq_length per tile."""
    return [(b - a) // image_seq_length for a, b in image_spans(input_ids, image_token_id)]


def best_of_n(engine: Engine, prm, tokenizer, question: str, input_ids: list[int], pixel_values: torch.Tensor | None, *,
              n: int = 8, temperature: float = 0.7, top_k: int = 0, max_tokens: int = 256, seed: int = 0,
              scorer: str = "prm", tiles_per_image: list[int] | None = None,
              prm_max_steps: int = 12) -> tuple[str, Candidates]:
    """The best of n samples for one prompt (`question` is its user text, which the PRM sees) and all candidates.
    A question with several images places each image's tiles at its own placeholder in the PRM's
    conversation: `tiles_per_image` (tiles of each `<image>` in order), read from the prompt's image
    spans when not given."""
    texts = sample_candidates(engine, [input_ids], [pixel_values], n=n, temperature=temperature, top_k=top_k,
                              max_tokens=max_tokens, seed=seed)[0]
    cands = Candidates(texts)
    if prm is not None and tiles_per_image is None and pixel_values is not None:
        policy = engine.model.config  # the prompt is the policy's: its image token and tokens per tile
        tiles_per_image = tiles_in_prompt(input_ids, policy.image_token_id, policy.image_seq_length)
    if prm is not None:
        cands.step_scores = step_scores(prm, tokenizer, question, texts, pixel_values, tiles_per_image,
                                        max_steps=prm_max_steps)
    return texts[cands.pick(scorer)], cands
