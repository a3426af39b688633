"""The toy world as training data: streamed records (no files) or InternVL-format files on disk,
and the tokenizer trained on its text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from nativevl.data.records import Record
from nativevl.data.toyworld.render import CELL_NAMES, GLYPHS, PALETTE, SHAPES
from nativevl.data.toyworld.tasks import ANIMALS, FAMILIES, NUMBER_WORDS, example, image_labels, text_document

DESCRIBE = "<image>\ndescribe the image."
STAGES = ("pretrain", "sft")


def describe_prompt(n_images: int) -> str:
    """The pre-training caption prompt; several pictures are numbered as InternVL numbers them."""
    if n_images == 1:
        return DESCRIBE
    return image_labels(n_images) + "describe the images."


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


class ToyWorldSource:
    """Family `family` as an endless-looking dataset of `length` distinct records, generated on demand.

    stage "pretrain": image families give captions ("describe the image."), multi-image gives its
    question, "text" gives plain documents (every token learnt); stage "sft": the task questions.
    """

    def __init__(self, family: str, stage: str, seed: int, length: int = 200_000, size: int = 96, weight: float = 1.0,
                 turns: int = 1):
        if family not in FAMILIES:
            raise ValueError(f"unknown toy-world family {family!r}; known: {sorted(FAMILIES)}")
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.family, self.stage, self.seed, self.length, self.size = family, stage, seed, length, size
        self.name = f"toyworld-{family}-{stage}"
        self.repeat_time = weight  # mixture weight relative to the other sources of the same length
        self.turns = turns  # SFT: up to this many questions about the same image(s) in one conversation

    def __len__(self) -> int:
        return self.length

    def is_text_only(self) -> bool:
        return self.family == "text"

    def get(self, i: int) -> Record:
        source = f"{self.name}:{i}"
        if self.family == "text" and self.stage == "pretrain":
            rng = np.random.default_rng([self.seed, 99, i])
            return Record(conversations=[], text=text_document(rng), source=source)
        ex = example(self.family, self.seed, i, self.size)
        images = [Image.fromarray(im) for im in ex.images]
        if self.stage == "pretrain" and ex.caption is not None and images:
            conv = conversation(describe_prompt(len(images)), ex.caption)
        else:
            conv = conversation(ex.question, ex.answer)
            rng = np.random.default_rng([self.seed, 77, i])
            for k in rng.permutation(len(ex.more))[: self.turns - 1]:
                conv += conversation(*ex.more[int(k)])
        return Record(conversations=conv, images=images, source=source, max_dynamic_patch=1)


def corpus() -> list[str]:
    """Text covering every word the toy world uses, for the tokenizer. Words also appear at the
    start of a line, as answers do, so that an answer and the same word inside a sentence are both
    single tokens; glyphs only appear alone, so that what is written is read one character a token."""
    words = list(PALETTE) + list(SHAPES) + list(CELL_NAMES) + list(ANIMALS) + list(NUMBER_WORDS)
    words += [s for pair in ANIMALS.values() for s in pair]
    texts = [" ".join(words), *words, *words, " ".join(GLYPHS), *GLYPHS]
    for family in FAMILIES:
        if family == "reading":
            continue
        for i in range(200):
            ex = example(family, 12345, i)
            texts += [ex.question, ex.answer, ex.caption or ""]
            texts += [q for q, _ in ex.more] + [a for _, a in ex.more]
    texts += ["what is written?", "describe the image.", "the text reads"]
    texts += [f"what is the {k} character?" for k in ("first", "second", "third")]
    rng = np.random.default_rng(0)
    texts += [text_document(rng) for _ in range(200)]
    texts += [f"{a} + {b} = {a + b}" for a in range(30) for b in range(10)]
    return texts


def write_dataset(folder: str | Path, families: list[str], stage: str, seed: int, n_per_family: int, size: int = 96) -> Path:
    """InternVL-format files (meta json, one jsonl per family, PNG images) for inspection or other tools."""
    folder = Path(folder)
    meta = {}
    for family in families:
        src = ToyWorldSource(family, stage, seed, size=size)
        (folder / family).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n_per_family):
            rec = src.get(i)
            if rec.text is not None:
                lines.append({"text": rec.text})
                continue
            names = []
            for k, im in enumerate(rec.images):
                name = f"{family}/{i}-{k}.png"
                im.save(folder / name)
                names.append(name)
            line = {"id": f"{family}-{i}", "conversations": rec.conversations}
            if names:
                line["image"] = names if len(names) > 1 else names[0]
            lines.append(line)
        (folder / f"{family}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        meta[family] = {"root": "", "annotation": f"{family}.jsonl", "max_dynamic_patch": 1, "data_augment": False}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder / "meta.json"
