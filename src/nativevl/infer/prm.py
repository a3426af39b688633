"""Process reward model (VisualPRM form): step splitting, the multi-turn PRM conversation, and
scoring a whole response in one forward pass.

A response is split into steps on blank lines (more than `max_steps` are merged evenly). The PRM
conversation puts the question and the first step in the first user turn and every later step in a
user turn of its own; each assistant turn is '+' (the solution is right so far) or '-'. To score, the
assistant turns all hold '+' as a placeholder; with causal attention the prediction at each slot
sees only the steps up to it, so one forward gives every step's P('+') (normalised over '+' and '-').
The response's score is the mean over its steps.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from nativevl.data.processor import pad_batch
from nativevl.data.template import IGNORE_INDEX, encode_conversation, has_image_markup
from nativevl.model.vlm import VisionLanguageModel

PRM_SYSTEM_MESSAGE = (
    "You check solutions step by step. For each step of the solution process, answer '+' if the "
    "solution is correct up to and including this step, and '-' if it contains an error."
)
GOOD, BAD = "+", "-"


def split_steps(response: str, max_steps: int = 12) -> list[str]:
    """Steps are separated by blank lines; more than `max_steps` are merged into `max_steps` even groups."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    steps = [s.strip() for s in response.strip().split("\n\n") if s.strip()]
    if len(steps) <= max_steps:
        return steps
    edges = np.linspace(0, len(steps), max_steps + 1).round().astype(int)
    return ["\n\n".join(steps[a:b]) for a, b in itertools.pairwise(edges) if b > a]


def prm_conversation(question: str, steps: list[str], labels: list[str] | None = None) -> list[dict[str, str]]:
    """The multi-turn PRM conversation; labels default to '+' placeholders (scoring)."""
    if not steps:
        raise ValueError("a PRM conversation needs at least one step")
    labels = labels if labels is not None else [GOOD] * len(steps)
    if len(labels) != len(steps) or any(lab not in (GOOD, BAD) for lab in labels):
        raise ValueError(f"need one '+'/'-' label per step: {len(steps)} steps, labels {labels}")
    turns = [{"from": "system", "value": PRM_SYSTEM_MESSAGE},
             {"from": "human", "value": f"### Question:\n{question}\n\n### Solution Process:\n{steps[0]}"},
             {"from": "gpt", "value": labels[0]}]
    for step, label in zip(steps[1:], labels[1:], strict=True):
        turns += [{"from": "human", "value": step}, {"from": "gpt", "value": label}]
    return turns


def label_token_ids(tokenizer) -> tuple[int, int]:
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in (GOOD, BAD)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the tokenizer must encode '+' and '-' as one token each, got {ids}")
    return ids[0][0], ids[1][0]


def encode_for_scoring(tokenizer, question: str, steps: list[str], tiles_per_image: list[int],
                       image_seq_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, slot positions): the positions whose next-token prediction is a step's '+'/'-'."""
    ids, labels = encode_conversation(tokenizer, prm_conversation(question, steps), tiles_per_image=tiles_per_image,
                                      image_seq_length=image_seq_length, system_message=None)
    good, _ = label_token_ids(tokenizer)
    # the first labelled token of each assistant turn is the '+' placeholder
    slots = [i - 1 for i in range(1, len(ids)) if labels[i] == good and labels[i - 1] == IGNORE_INDEX]
    if len(slots) != len(steps):
        raise ValueError(f"found {len(slots)} assistant slots for {len(steps)} steps")
    return ids, slots


@torch.no_grad()
def step_scores(
    model: VisionLanguageModel,
    tokenizer,
    question: str,
    responses: list[str],
    pixel_values: torch.Tensor | None = None,
    tiles_per_image: list[int] | None = None,
    *,
    max_steps: int = 12,
    batch_size: int = 8,
) -> list[list[float]]:
    """P('+') of every step of every response, one forward per response (batched, left padding).
    `pixel_values` are the question's tiles (shared by all responses). A response that cannot be a
    solution scores [0.0]: an empty one (the PRM never trained on one; its score would be noise), and
    one holding image markup (`<image>`, `<IMG_CONTEXT>` ...) or chat-turn markers (`<|im_start|>`,
    `<|im_end|>`), which would ask for images or forge turns of the PRM's conversation."""
    tiles_per_image = tiles_per_image or ([] if pixel_values is None else [int(pixel_values.shape[0])])
    good, bad = label_token_ids(tokenizer)
    readable = [r for r in responses if scorable(r)]
    encoded = [encode_for_scoring(tokenizer, question, split_steps(r, max_steps) or [r.strip() or "."],
                                  tiles_per_image, model.config.image_seq_length) for r in readable]
    device = model.device
    out: list[list[float]] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        input_ids, mask = pad_batch([ids for ids, _ in chunk], tokenizer.pad_token_id or 0, side="left")
        pixels = tile_index = None
        if pixel_values is not None:  # the ViT runs once; every row's image slots read the same tiles
            pixels = pixel_values.to(device)
            tile_index = torch.arange(pixels.shape[0], device=device).repeat(len(chunk))
        hidden = model(input_ids.to(device), pixels, tile_index=tile_index, attention_mask=mask.to(device),
                       compute_logits=False).hidden_states  # (B, T, C)
        width = input_ids.shape[1]
        head = model.lm_head.weight[[good, bad]]  # (2, C): only the two label logits are needed
        for row, (ids, slots) in enumerate(chunk):
            at = torch.tensor(slots, device=device) + (width - len(ids))
            pair = (hidden[row, at] @ head.t()).float()  # (steps, 2)
            out.append(pair.softmax(-1)[:, 0].tolist())
    scored = iter(out)
    return [next(scored) if scorable(r) else [0.0] for r in responses]


def scorable(response: str) -> bool:
    """Whether a response can be put in the PRM's turns as a solution (see step_scores)."""
    return bool(response.strip()) and not has_image_markup(response) and not any(
        m in response for m in ("<|im_start|>", "<|im_end|>"))


def response_scores(model, tokenizer, question, responses, pixel_values=None, tiles_per_image=None, *,
                    max_steps: int = 12, batch_size: int = 8) -> list[float]:
    """The mean step score of each response (VisualPRM's choice; mean was best in its ablation)."""
    per_step = step_scores(model, tokenizer, question, responses, pixel_values, tiles_per_image,
                           max_steps=max_steps, batch_size=batch_size)
    return [float(np.mean(s)) for s in per_step]
