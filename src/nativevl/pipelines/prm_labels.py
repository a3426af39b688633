"""PRM training data by Monte Carlo rollouts (VisualPRM400K's recipe).

For each question, sample a few solutions; for each step prefix of a solution, sample continuations
and score mc = #correct / #sampled; the step is '+' iff mc > 0 (the last step: iff the solution
itself is right). Every step is supervised, not only those before the first error. The output is
InternVL conversation jsonl in the multi-turn PRM format of infer/prm.py, so the PRM trains as an
ordinary SFT stage of the one loop. A video question is asked with `num_frames` frames (as `nativevl
eval` asks it); its records name the video, whose frames take the place of its `<video>`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nativevl.infer.prm import BAD, GOOD, prm_conversation, scorable, split_steps
from nativevl.pipelines.questions import (
    Progress,
    Question,
    sample_responses,
    visual_prompts,
    write_records,
    written_question,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PRMDataConfig:
    solutions: int = 4  # sampled solutions per question
    rollouts: int = 16  # continuations per step prefix
    temperature: float = 1.0
    solution_temperature: float = 0.7
    top_k: int = 50
    max_steps: int = 12
    max_new_tokens: int = 256
    mc_threshold: float = 0.0  # '+' iff mc > threshold
    seed: int = 0
    num_frames: int = 8  # a video question's frames

    def __post_init__(self) -> None:  # checked before hours of sampling, not after
        for name in ("solutions", "rollouts", "max_steps", "max_new_tokens", "num_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0 or self.solution_temperature < 0 or self.top_k < 0:
            raise ValueError("temperatures and top_k must be >= 0")
        if not 0 <= self.mc_threshold < 1:
            raise ValueError(f"mc_threshold must be in [0, 1), got {self.mc_threshold}")


def build_prm_data(model, tokenizer, questions: list[Question], cfg: PRMDataConfig, out: str | Path,
                   system_message: str | None = None, progress: Progress | None = None) -> dict:
    """Write PRM conversations (+ images) to `out` (a .jsonl path); returns counts. With `progress`,
    solutions and rollouts are kept as they finish and an interrupted run resumes (see `Progress`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if any(q.answer is None for q in questions):
        raise ValueError("PRM labels need a ground truth for every question")
    if progress is not None:
        progress.check()
    size = model.config.vision.image_size if any(q.video is not None for q in questions) else 0
    asked = visual_prompts(questions, cfg.num_frames, size)  # by question index; an undecodable video's left out
    solutions = sample_responses(model, tokenizer, [(*asked[qi], "") for qi in sorted(asked)], cfg.solutions,
                                 temperature=cfg.solution_temperature, top_k=cfg.top_k,
                                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, system_message=system_message,
                                 desc="solutions", progress=progress)
    items, prompts = [], []  # items: (question index, steps); prompts: one per non-final step prefix
    dropped = duplicates = 0
    for qi, sols in zip(sorted(asked), solutions, strict=True):
        q = questions[qi]
        seen: set[tuple[str, ...]] = set()
        for sol in sols:
            steps = split_steps(sol, cfg.max_steps)
            if not steps or not scorable(sol):
                dropped += 1
                continue
            if tuple(steps) in seen:  # the same solution again: the same record, rollouts spent twice
                duplicates += 1
                continue
            seen.add(tuple(steps))
            items.append((qi, steps, q.is_correct(sol)))
            for i in range(len(steps) - 1):
                prompts.append((*asked[qi], "\n\n".join(steps[: i + 1]) + "\n\n"))
    rollouts = sample_responses(model, tokenizer, prompts, cfg.rollouts, temperature=cfg.temperature, top_k=cfg.top_k,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1, system_message=system_message,
                                desc="rollouts", progress=progress)
    it = iter(zip(prompts, rollouts, strict=True))
    stats = {"questions": len(questions), "solutions": len(items), "dropped_solutions": dropped,
             "duplicate_solutions": duplicates, "steps": 0, "negative_steps": 0, "correct_solutions": 0}
    if len(asked) < len(questions):
        stats["unreadable_videos"] = len(questions) - len(asked)
    def records():
        for qi, steps, solved in items:
            q = questions[qi]
            labels = []
            for _ in range(len(steps) - 1):
                (_, _, prefix), conts = next(it)
                mc = sum(q.is_correct(prefix + c) for c in conts) / len(conts)
                labels.append(GOOD if mc > cfg.mc_threshold else BAD)
            labels.append(GOOD if solved else BAD)
            stats["steps"] += len(labels)
            stats["negative_steps"] += labels.count(BAD)
            stats["correct_solutions"] += solved
            yield qi, {"conversations": prm_conversation(written_question(q), steps, labels)}

    write_records(out, questions, records())
    if progress is not None:
        progress.clear()
    log.info("PRM data: %s -> %s", stats, out)
    return stats
