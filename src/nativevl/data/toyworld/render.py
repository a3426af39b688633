"""Drawing for the toy world: shapes, a 5x7 bitmap font and bar charts, on numpy canvases.

Scenes sit on a 3x3 grid of cells so that each cell maps onto one visual token of the tiny demo
model (96 px tiles, patch 16, pixel shuffle 0.5 -> 3x3 tokens), and objects sit near their cell's
centre (a couple of pixels of jitter): binding a word to an object is then a matter of attending to
the right token, which a small model learns on a CPU in minutes.
"""

from __future__ import annotations

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
# two more colours for the multi-image family only (its pictures need up to 8 different colours); the
# single-image families keep the six above
MORE_COLOURS = {"pink": (245, 120, 185), "cyan": (40, 200, 215)}
PALETTE = {**COLOURS, **MORE_COLOURS}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
CELL_NAMES = ("top left", "top middle", "top right", "middle left", "center", "middle right",
              "bottom left", "bottom middle", "bottom right")
BACKGROUND = (245, 245, 240)

# 5x7 glyphs, one string of 7 rows of 5 columns each
_FONT_ROWS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "C": "01110 10001 10000 10000 10000 10001 01110",
    "E": "11111 10000 10000 11110 10000 10000 11111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "P": "11110 10001 10001 11110 10000 10000 10000", "R": "11110 10001 10001 11110 10100 10010 10001",
    "T": "11111 00100 00100 00100 00100 00100 00100", "X": "10001 10001 01010 00100 01010 10001 10001",
}
FONT = {ch: np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool) for ch, rows in _FONT_ROWS.items()}
GLYPHS = tuple(FONT)


def canvas(size: int) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    return img


def shape_mask(shape: str, side: int) -> np.ndarray:
    """A boolean (side, side) mask of a shape centred in its box."""
    yy, xx = np.mgrid[0:side, 0:side]
    c = (side - 1) / 2
    dy, dx = (yy - c) / (side / 2), (xx - c) / (side / 2)
    if shape == "circle":
        return dx**2 + dy**2 <= 0.9
    if shape == "square":
        return (abs(dx) <= 0.8) & (abs(dy) <= 0.8)
    if shape == "triangle":
        return (dy >= -0.85) & (dy <= 0.85) & (abs(dx) <= (dy + 0.85) / 2)
    if shape == "cross":
        return ((abs(dx) <= 0.3) | (abs(dy) <= 0.3)) & (abs(dx) <= 0.9) & (abs(dy) <= 0.9)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= 0.95
    raise ValueError(f"unknown shape {shape!r}")


def cell_box(cell: int, size: int) -> tuple[int, int, int]:
    """(top, left, side) of one of the 3x3 cells."""
    side = size // 3
    return (cell // 3) * side, (cell % 3) * side, side


def _place(side: int, extent: int, jitter: int, rng: np.random.Generator) -> int:
    """Offset of an object in its cell: centred, moved by up to `jitter` pixels."""
    centre = (side - extent) // 2
    low, high = max(0, centre - jitter), min(side - extent, centre + jitter)
    return int(rng.integers(low, high + 1))


def draw_shape(img: np.ndarray, cell: int, shape: str, colour: str, rng: np.random.Generator, jitter: int = 2) -> None:
    top, left, side = cell_box(cell, img.shape[0])
    s = int(side * 0.75)
    y, x = top + _place(side, s, jitter, rng), left + _place(side, s, jitter, rng)
    img[y : y + s, x : x + s][shape_mask(shape, s)] = PALETTE[colour]


def draw_glyph(img: np.ndarray, cell: int, ch: str, rng: np.random.Generator, colour=(20, 20, 20), jitter: int = 2) -> None:
    top, left, side = cell_box(cell, img.shape[0])
    scale = max(1, side // 9)
    glyph = np.kron(FONT[ch], np.ones((scale, scale), dtype=bool))  # (7s, 5s)
    gh, gw = glyph.shape
    y, x = top + _place(side, gh, jitter, rng), left + _place(side, gw, jitter, rng)
    img[y : y + gh, x : x + gw][glyph] = colour


def draw_numbered_object(img: np.ndarray, shape: str, colour: str, label: str, rng: np.random.Generator,
                         fill: float = 0.9, scale: int = 6) -> None:
    """One object filling most of the picture with `label` drawn large over its middle, as on a numbered
    photo: every visual token of the picture then shows part of both. An empty label draws the object alone."""
    size = img.shape[0]
    side = int(size * fill)
    y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    img[y : y + side, x : x + side][shape_mask(shape, side)] = PALETTE[colour]
    if not label:
        return
    glyphs = np.concatenate([np.kron(FONT[ch], np.ones((scale, scale), dtype=bool)) for ch in label], axis=1)
    gh, gw = glyphs.shape
    if gh + 6 > size or gw + 6 > size:
        raise ValueError(f"label {label!r} at scale {scale} does not fit a {size}-pixel picture")
    gy, gx = (size - gh) // 2 + int(rng.integers(-3, 4)), (size - gw) // 2 + int(rng.integers(-3, 4))
    img[gy : gy + gh, gx : gx + gw][glyphs] = (20, 20, 20)


def draw_bars(img: np.ndarray, values: list[int], colours: list[str], max_value: int) -> None:
    """One bar per column of width size / len(values); value v fills v / (max_value + 1) of the height."""
    size = img.shape[0]
    width = size // len(values)
    unit = size // (max_value + 1)
    for k, (v, c) in enumerate(zip(values, colours)):
        x0 = k * width + width // 8
        img[size - v * unit : size, x0 : (k + 1) * width - width // 8] = PALETTE[c]
