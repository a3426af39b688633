"""Preference pairs for MPO (MMPR's two pipelines).

Correctness: sample N responses per question, verify each; correct ones are chosen, wrong or
unparseable ones rejected; at most K pairs per question. DropoutNTP (no ground truth): a sampled
response is chosen; its first half, continued by the same model *without the image*, is rejected.
A video question is asked with `num_frames` frames (as `nativevl eval` asks it); its pairs name the video,
and DropoutNTP continues without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nativevl.data.template import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from nativevl.pipelines.questions import (
    Progress,
    Question,
    has_image_markup,
    sample_responses,
    visual_prompts,
    write_records,
    written_question,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreferenceConfig:
    n: int = 32  # responses per question
    temperature: float = 0.7
    top_k: int = 50
    max_pairs: int = 15  # per question
    max_new_tokens: int = 256
    dropout_ratio: float = 0.5  # DropoutNTP: where the chosen response is cut
    seed: int = 0
    num_frames: int = 8  # a video question's frames

    def __post_init__(self) -> None:
        if self.n < 2 or self.max_pairs < 1:
            raise ValueError(f"need n >= 2 responses and max_pairs >= 1, got n={self.n}, max_pairs={self.max_pairs}")
        if not 0 < self.dropout_ratio < 1:
            raise ValueError(f"dropout_ratio must be in (0, 1), got {self.dropout_ratio}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")


def correctness_pairs(responses: list[str], correct: list[bool], max_pairs: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Up to max_pairs (chosen, rejected), distinct pairs drawn evenly over correct x wrong responses."""
    good = list(dict.fromkeys(r for r, ok in zip(responses, correct, strict=True) if ok))
    bad = list(dict.fromkeys(r for r, ok in zip(responses, correct, strict=True) if not ok))
    if not good or not bad:
        return []
    combos = [(g, b) for g in good for b in bad]
    pick = rng.permutation(len(combos))[:max_pairs]
    return [combos[i] for i in sorted(pick)]


def _without_images(question: str) -> str:
    for mark in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        question = question.replace(mark + "\n", "").replace(mark, "")
    return question.strip()


def build_preference_data(model, tokenizer, questions: list[Question], cfg: PreferenceConfig, out: str | Path,
                          system_message: str | None = None, progress: Progress | None = None) -> dict:
    """Write preference jsonl (+ images) to `out` (a .jsonl path); returns counts. With `progress`,
    the sampling is kept as it finishes and an interrupted run resumes (see `Progress`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress.check()
    rng = np.random.default_rng(cfg.seed)
    size = model.config.vision.image_size if any(q.video is not None for q in questions) else 0
    prompts = visual_prompts(questions, cfg.num_frames, size)  # by question index; an undecodable video's left out
    asked = sorted(prompts)
    samples = sample_responses(model, tokenizer, [(*prompts[qi], "") for qi in asked], cfg.n,
                               temperature=cfg.temperature, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens,
                               seed=cfg.seed, system_message=system_message, desc="responses", progress=progress)
    lines, stats = [], {"questions": len(questions), "pairs": 0, "correctness_pairs": 0, "dropout_ntp_pairs": 0,
                        "all_correct": 0, "all_wrong": 0, "sampled_accuracy": 0.0}
    if len(asked) < len(questions):
        stats["unreadable_videos"] = len(questions) - len(asked)
    ntp_prompts, ntp_owner = [], []
    n_correct = 0
    for qi, responses in zip(asked, samples, strict=True):
        q = questions[qi]
        # an empty or whitespace-only response (the model ended at once) cannot be a side of a pair:
        # the preference loader rejects such records
        kept = [r for r in responses if r.strip() and not has_image_markup(r)]
        stats["dropped_responses"] = stats.get("dropped_responses", 0) + len(responses) - len(kept)
        responses = kept
        if not responses:
            continue
        if q.answer is None:  # DropoutNTP: cut a response at the ratio, let the model go on without the image
            chosen = responses[int(rng.integers(len(responses)))]
            cut = chosen[: max(1, int(len(chosen) * cfg.dropout_ratio))]
            ntp_prompts.append((_without_images(q.question), [], cut))
            ntp_owner.append((qi, chosen, cut))
            continue
        correct = [q.is_correct(r) for r in responses]
        n_correct += sum(correct)
        stats["all_correct"] += all(correct)
        stats["all_wrong"] += not any(correct)
        for chosen, rejected in correctness_pairs(responses, correct, cfg.max_pairs, rng):
            lines.append((qi, chosen, rejected))
            stats["correctness_pairs"] += 1
    if ntp_prompts:
        continuations = sample_responses(model, tokenizer, ntp_prompts, 1, temperature=cfg.temperature, top_k=cfg.top_k,
                                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1,
                                         system_message=system_message, desc="dropout-ntp", progress=progress)
        for (qi, chosen, cut), (cont,) in zip(ntp_owner, continuations, strict=True):
            if (cut + cont).strip() and (cut + cont).strip() != chosen.strip() and not has_image_markup(cont):
                lines.append((qi, chosen, cut + cont))
                stats["dropout_ntp_pairs"] += 1
    write_records(out, questions, ((qi, {"question": written_question(questions[qi]), "chosen": chosen,
                                         "rejected": rejected}) for qi, chosen, rejected in lines))
    if progress is not None:
        progress.clear()
    stats["pairs"] = len(lines)
    verified = [qi for qi in asked if questions[qi].answer is not None]
    stats["sampled_accuracy"] = n_correct / max(1, len(verified) * cfg.n)  # dropped responses count as wrong
    log.info("preference data: %s -> %s", stats, out)
    return stats
