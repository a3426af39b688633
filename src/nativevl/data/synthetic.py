"""A small generated dataset for debug runs: coloured squares to name and counting text.

Learnable in a few dozen steps by a tiny model, written in InternVL's real format (meta json,
jsonl, PNG files) so the whole data path is exercised. Kept apart from the toy world on purpose:
its text is nearly deterministic, so `debug_tiny`'s loss falls to a small fraction in 40 steps,
which the learning test relies on; the toy world's richer tasks (data/toyworld) are for the demo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def corpus() -> list[str]:
    """Every text the generated records use (to train a tokenizer on)."""
    texts = [f"what colour is the square? the square is {c}" for c in COLOURS]
    texts += [" ".join(NUMBERS[i:] + NUMBERS[:i]) for i in range(len(NUMBERS))]
    return texts * 4


def write_dataset(folder: str | Path, n_images: int = 96, n_texts: int = 64, seed: int = 0, size: int = 56) -> Path:
    """Write images, annotations and a meta json into folder; returns the meta path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lines = []
    for i in range(n_images):
        colour = names[i % len(names)]
        canvas = np.full((size, size, 3), 245, dtype=np.uint8)
        side = int(rng.integers(size // 3, size // 2))
        x, y = rng.integers(0, size - side, size=2)
        canvas[y : y + side, x : x + side] = COLOURS[colour]
        Image.fromarray(canvas).save(folder / "images" / f"{i}.png")
        lines.append({"image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the square?"},
            {"from": "gpt", "value": f"the square is {colour}"}]})
    (folder / "squares.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    texts = []
    for i in range(n_texts):
        start = int(rng.integers(0, len(NUMBERS)))
        texts.append({"text": " ".join(NUMBERS[(start + k) % len(NUMBERS)] for k in range(len(NUMBERS)))})
    (folder / "counting.jsonl").write_text("\n".join(json.dumps(x) for x in texts) + "\n")
    meta = {
        "squares": {"root": "", "annotation": "squares.jsonl", "data_augment": False, "max_dynamic_patch": 1},
        "counting": {"annotation": "counting.jsonl"},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder / "meta.json"
