"""A process-reward model's training targets: its label tokens shown as a placeholder in the input, and
optionally the text of every step that is right so far learnt too (DataConfig.prm_placeholder /
prm_step_lm)."""

from __future__ import annotations

import numpy as np

from nativevl.data.template import IGNORE_INDEX


def prm_placeholders(input_ids: np.ndarray, labels: np.ndarray, tokenizer, placeholder: str) -> tuple[np.ndarray, np.ndarray]:
    """The first labelled token of every assistant turn (a PRM's '+' / '-') replaced by `placeholder`,
    and the indices of those tokens."""
    ids = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"prm_placeholder {placeholder!r} must be one token, got {ids}")
    starts = np.flatnonzero((labels != IGNORE_INDEX) & (np.concatenate([[IGNORE_INDEX], labels[:-1]]) == IGNORE_INDEX))
    out = input_ids.copy()
    out[starts] = ids[0]
    return out, starts


def prm_step_targets(input_ids: np.ndarray, labels: np.ndarray, tokenizer, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Labels and per-token weights with the user turns of the steps that are right so far learnt too
    (cfg: the DataConfig; its image_token_id and prm_step_lm).

    Turns are found at `<|im_start|>`; a user turn followed by an assistant turn is a step, right so
    far while every label up to its own is '+'. Its tokens after its last image token become targets
    at weight cfg.prm_step_lm; the labels keep weight 1."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    good = tokenizer("+", add_special_tokens=False).input_ids
    image_ids = [cfg.image_token_id] + [t for t in tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
                                        if t is not None and t != tokenizer.unk_token_id]
    starts = np.flatnonzero(input_ids == im_start).tolist()
    turns = list(zip(starts, starts[1:] + [len(input_ids)], strict=True))
    answered = [bool((labels[a:b] != IGNORE_INDEX).any()) for a, b in turns]
    out = labels.copy()
    weights = np.where(labels != IGNORE_INDEX, 1.0, 0.0).astype(np.float32)
    for k, (a, b) in enumerate(turns[:-1]):
        if answered[k] or not answered[k + 1]:
            continue
        na, nb = turns[k + 1]
        label = labels[na + int(np.flatnonzero(labels[na:nb] != IGNORE_INDEX)[0])]
        if [int(label)] != good:
            break  # this step and every later one follow an error
        images = np.flatnonzero(np.isin(input_ids[a:b], image_ids))
        lo = a + (int(images[-1]) + 1 if len(images) else 0)
        out[lo:b] = input_ids[lo:b]
        weights[lo:b] = cfg.prm_step_lm
    return out, weights
