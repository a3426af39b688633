"""Position ids: integer positions per document, or V2PE's variable visual position encoding.

V2PE (InternVL3 §2.1; OpenGVLab/V2PE's get_rope_pos_id): text tokens (including <img> and </img>)
advance the position by 1; the k-th visual token of an image sits at `start + delta * k`, where
`start` is the position of the token before the image and delta = S / 256 is fixed per image, with
S drawn from {1, 2, 4, ..., 256} in training (so delta in {1/256, ..., 1/2, 1}) or given at
inference. After an image the position continues from ceil(last visual position). delta = 1 is
exactly the integer encoding. Positions are float32.
"""

from __future__ import annotations

import math

import numpy as np

V2PE_STRIDES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def integer_positions(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.float32)


def image_spans(input_ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of every run of image tokens."""
    is_img = np.concatenate([[False], np.asarray(input_ids) == image_token_id, [False]])
    edges = np.flatnonzero(is_img[1:] != is_img[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def v2pe_positions(
    input_ids: np.ndarray,
    image_token_id: int,
    deltas: list[float],
) -> np.ndarray:
    """Positions with one delta per image span (in order of appearance): (T,) float32."""
    spans = image_spans(input_ids, image_token_id)
    if len(spans) != len(deltas):
        raise ValueError(f"{len(spans)} image span(s) but {len(deltas)} delta(s)")
    pos = np.empty(len(input_ids), dtype=np.float64)
    last = -1.0  # position of the previous token
    cursor = 0
    for (start, end), delta in zip(spans, deltas):
        if not 0 < delta <= 1:
            raise ValueError(f"V2PE delta must be in (0, 1], got {delta}")
        n_text = start - cursor
        pos[cursor:start] = last + 1 + np.arange(n_text)
        last = last + n_text
        pos[start:end] = last + delta * np.arange(1, end - start + 1)
        last = float(math.ceil(pos[end - 1]))
        cursor = end
    pos[cursor:] = last + 1 + np.arange(len(input_ids) - cursor)
    return pos.astype(np.float32)


def sample_v2pe_deltas(n_images: int, rng: np.random.Generator) -> list[float]:
    """Training: one stride S per image from {1, 2, ..., 256}, delta = S / 256 (the reference's
    S / num_image_token for 256-token tiles; kept at /256 for models with other tile sizes)."""
    return [float(s) / 256 for s in rng.choice(V2PE_STRIDES, size=n_images)]


def document_positions(
    input_ids: np.ndarray,
    image_token_id: int,
    *,
    v2pe: str = "off",
    rng: np.random.Generator | None = None,
    delta: float = 1.0,
) -> np.ndarray:
    """Positions of one document. v2pe: "off" (integers), "random" (training), "fixed" (`delta`)."""
    if v2pe == "off":
        return integer_positions(len(input_ids))
    n_images = len(image_spans(input_ids, image_token_id))
    if v2pe == "random":
        if rng is None:
            raise ValueError("v2pe='random' needs an rng")
        deltas = sample_v2pe_deltas(n_images, rng)
    elif v2pe == "fixed":
        deltas = [delta] * n_images
    else:
        raise ValueError(f"v2pe must be 'off', 'random' or 'fixed', got {v2pe!r}")
    return v2pe_positions(np.asarray(input_ids), image_token_id, deltas)
