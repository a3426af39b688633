"""Toy-world task families: seeded generators of questions whose answers a program verifies.

Each example has images (uint8 arrays), a question, a reference answer, a `kind` (question type)
and, for pre-training, a caption. Chance level of a family is what always giving the most frequent
answer of each question kind scores (measured on 2,000 questions of the evaluation's seed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from nativevl.data.toyworld.render import (
    CELL_NAMES,
    COLOURS,
    GLYPHS,
    PALETTE,
    SHAPES,
    canvas,
    draw_bars,
    draw_glyph,
    draw_numbered_object,
    draw_shape,
)

COLOUR_NAMES = tuple(COLOURS)
ANIMALS = {  # the text-only world: a colour and a sound per animal
    "fox": ("orange", "yips"), "crow": ("purple", "caws"), "frog": ("green", "croaks"), "cow": ("yellow", "moos"),
    "owl": ("blue", "hoots"), "duck": ("yellow", "quacks"), "wolf": ("blue", "howls"), "cat": ("orange", "meows"),
    "lion": ("yellow", "roars"), "bee": ("red", "buzzes"), "pig": ("red", "oinks"), "dog": ("green", "barks"),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass
class Example:
    family: str
    kind: str
    question: str  # with one <image> per image, or none
    answer: str
    images: list[np.ndarray] = field(default_factory=list)
    caption: str | None = None  # pre-training text for the image(s)
    more: list[tuple[str, str]] = field(default_factory=list)  # other (question, answer) pairs on the same images


def _scene(rng: np.random.Generator, size: int, n: int):
    cells = rng.choice(9, size=n, replace=False)
    combos = rng.choice(len(COLOUR_NAMES) * len(SHAPES), size=n, replace=False)
    objects = [(int(c), COLOUR_NAMES[k // len(SHAPES)], SHAPES[k % len(SHAPES)]) for c, k in zip(cells, combos)]
    img = canvas(size)
    for cell, colour, shape in objects:
        draw_shape(img, cell, shape, colour, rng)
    return img, sorted(objects)


def _describe(objects) -> str:
    return ", ".join(f"a {colour} {shape} at {CELL_NAMES[cell]}" for cell, colour, shape in objects) + "."


def _shape_questions(objects) -> list[tuple[str, str, str]]:
    """Every (kind, question, answer) a scene supports: colour of a unique shape, shape of a unique
    colour, position of each object, and the count."""
    qa = []
    for cell, colour, shape in objects:
        if sum(p[2] == shape for p in objects) == 1:
            qa.append(("colour", f"what colour is the {shape}?", colour))
        if sum(p[1] == colour for p in objects) == 1:
            qa.append(("shape", f"what shape is the {colour} one?", shape))
        qa.append(("position", f"where is the {colour} {shape}?", CELL_NAMES[cell]))
    qa.append(("count", "how many shapes are there?", str(len(objects))))
    return qa


def shapes(rng: np.random.Generator, size: int = 96) -> Example:
    """Colour of a named shape, shape of a named colour, count, or position (a 3x3 cell name)."""
    kind = str(rng.choice(["colour", "shape", "count", "position"]))
    while True:
        img, objects = _scene(rng, size, int(rng.integers(1, 6)))
        qa = _shape_questions(objects)
        pick = [x for x in qa if x[0] == kind]
        if pick:
            break
    _, question, answer = pick[int(rng.integers(0, len(pick)))]
    more = [(q, a) for _, q, a in qa if q != question]
    return Example("shapes", kind, f"<image>\n{question}", answer, [img], _describe(objects), more)


def reading(rng: np.random.Generator, size: int = 96) -> Example:
    text = "".join(GLYPHS[int(k)] for k in rng.integers(0, len(GLYPHS), size=3))
    img = canvas(size)
    for k, ch in enumerate(text):
        draw_glyph(img, 3 + k, ch, rng)  # the middle row
    more = [(f"what is the {['first', 'second', 'third'][k]} character?", ch) for k, ch in enumerate(text)]
    return Example("reading", "read", "<image>\nwhat is written?", text, [img], f"the text reads {text}.", more)


def charts(rng: np.random.Generator, size: int = 96, bars: int = 6, max_value: int = 6) -> Example:
    colours = [COLOUR_NAMES[int(k)] for k in rng.permutation(len(COLOUR_NAMES))[:bars]]
    while True:
        values = [int(v) for v in rng.integers(1, max_value + 1, size=bars)]
        if values.count(max(values)) == 1:
            break
    img = canvas(size)
    draw_bars(img, values, colours, max_value)
    caption = "a bar chart: " + ", ".join(f"{c} {v}" for c, v in zip(colours, values)) + "."
    tallest = colours[values.index(max(values))]
    qa = [(f"what is the value of the {c} bar?", str(v)) for c, v in zip(colours, values)]
    qa.append(("which bar is the tallest?", tallest))
    if rng.random() < 0.5:
        k = int(rng.integers(0, bars))
        return Example("charts", "value", f"<image>\n{qa[k][0]}", qa[k][1], [img], caption, qa[:k] + qa[k + 1 :])
    return Example("charts", "tallest", f"<image>\n{qa[-1][0]}", tallest, [img], caption, qa[:-1])


def arithmetic(rng: np.random.Generator, size: int = 96) -> Example:
    """Digits shown in the image; the answer reasons step by step, steps split by a blank line."""
    n = int(rng.integers(2, 4))
    digits = [int(d) for d in rng.integers(0, 10, size=n)]
    img = canvas(size)
    for k, d in enumerate(digits):
        draw_glyph(img, 3 + k, str(d), rng)
    listed = ", ".join(map(str, digits[:-1])) + f" and {digits[-1]}"
    steps = [f"the numbers are {listed}."]
    total = digits[0]
    for d in digits[1:]:
        steps.append(f"{total} + {d} = {total + d}")
        total += d
    steps.append(f"Final answer: {total}")
    return Example("arithmetic", f"add{n}", "<image>\nadd the numbers in the image. think step by step.",
                   "\n\n".join(steps), [img], f"the numbers {listed}.")


def image_labels(n: int) -> str:
    """InternVL's multi-image prompt prefix: `Image-1: <image>` ... one line per picture."""
    return "".join(f"Image-{i + 1}: <image>\n" for i in range(n))


NUMBERED_PICTURES = True  # multi-image: draw each picture's number on it (False: the number only in the prompt)


def multi_image(rng: np.random.Generator, size: int = 96, min_images: int = 5, max_images: int = 8) -> Example:
    """4-16 numbered pictures of one large object each: which image shows X? Answer: the object's colour
    and the picture's number ("red 3").

    The objects of one question have different colours (so at most len(PALETTE) = 8 pictures). Each picture
    carries its number drawn large over its object, as numbered photos and Set-of-Mark prompts do, so that
    every visual token of the picture holds both; the answer names the colour it looked for right before
    the number, so that the model finds the picture in one attention step from the colour it has just
    written. The pre-training caption lists every picture that way, in a random order. With
    NUMBERED_PICTURES False the number is only in the prompt's `Image-k:` label (the harder form).
    docs/demo/multi_image.md has why this form: the demo's tiny model learns it within its budget (1.000;
    0.600 without the drawn numbers), and the earlier `image k` answer stayed at chance.
    """
    if not 4 <= min_images <= max_images <= 16:
        raise ValueError(f"multi-image questions use 4 to 16 images, got {min_images}..{max_images}")
    if max_images > len(PALETTE):
        raise ValueError(f"multi-image pictures need different colours: at most {len(PALETTE)} images, got {max_images}")
    n = int(rng.integers(min_images, max_images + 1))
    colours = [list(PALETTE)[int(k)] for k in rng.permutation(len(PALETTE))[:n]]
    shapes = [SHAPES[int(k)] for k in rng.integers(0, len(SHAPES), size=n)]
    images = []
    for i, (colour, shape) in enumerate(zip(colours, shapes)):
        img = canvas(size)
        draw_numbered_object(img, shape, colour, str(i + 1) if NUMBERED_PICTURES else "", rng)
        images.append(img)
    prefix = image_labels(n)
    qa = [(f"which image shows the {colour} {shape}?", f"{colour} {i + 1}")
          for i, (colour, shape) in enumerate(zip(colours, shapes))]
    target = int(rng.integers(0, n))
    question, answer = qa[target]
    more = [x for i, x in enumerate(qa) if i != target]
    # pre-training text: every picture's colour and number, in a random order ("orange 3, yellow 1, ...")
    caption = ", ".join(qa[int(i)][1] for i in rng.permutation(n)) + "."
    return Example("multi_image", f"which{n}", prefix + question, answer, images, caption, more)


def text_facts(rng: np.random.Generator, size: int = 96) -> Example:
    """The language side: facts of a small world, asked without an image."""
    animal = list(ANIMALS)[int(rng.integers(0, len(ANIMALS)))]
    colour, sound = ANIMALS[animal]
    if rng.random() < 0.5:
        return Example("text", "colour", f"what colour is the {animal}?", colour, caption=f"the {animal} is {colour}.")
    return Example("text", "sound", f"what does the {animal} say?", sound, caption=f"the {animal} {sound}.")


def text_document(rng: np.random.Generator) -> str:
    """A plain document for native pre-training: facts of the animal world and counting."""
    animals = list(ANIMALS)
    parts = []
    for _ in range(int(rng.integers(2, 5))):
        a = animals[int(rng.integers(0, len(animals)))]
        colour, sound = ANIMALS[a]
        parts.append(f"the {a} is {colour} and the {a} {sound}." if rng.random() < 0.5 else f"the {colour} {a} {sound}.")
    start = int(rng.integers(0, 6))
    parts.append("counting: " + " ".join(NUMBER_WORDS[start : start + 5]) + ".")
    return " ".join(parts)


FAMILIES = {
    "shapes": shapes,
    "reading": reading,
    "charts": charts,
    "arithmetic": arithmetic,
    "multi_image": multi_image,
    "text": text_facts,
}

# ---------------------------------------------------------------- verifiers


def normalize(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"[\s]+", " ", text)
    return text.strip(" .!,;:")


def final_answer_text(text: str) -> str | None:
    """The text after the last `Final answer:` as written, or None when there is none."""
    found = re.findall(r"final answer:\s*([^\n]*)", text, flags=re.IGNORECASE)
    return found[-1] if found else None


def final_answer(text: str) -> str | None:
    """The value after the last `Final answer:`, normalised, or None when there is none."""
    found = final_answer_text(text)
    return normalize(found) if found is not None else None


def verify(family: str, prediction: str, reference: str) -> bool:
    """Exact match after normalisation; for chain of thought, the final answers must match."""
    if family == "arithmetic":
        got, want = final_answer(prediction), final_answer(reference)
        return got is not None and got == want
    return normalize(prediction) == normalize(reference)


def example(family: str, seed: int, index: int, size: int = 96) -> Example:
    """Example `index` of a family under `seed`: the same on every machine and in every process."""
    if family not in FAMILIES:
        raise ValueError(f"unknown toy-world family {family!r}; known: {sorted(FAMILIES)}")
    family_id = list(FAMILIES).index(family)
    return FAMILIES[family](np.random.default_rng([seed, family_id, index]), size)
