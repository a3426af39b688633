"""Image loading and InternVL's dynamic high-resolution tiling.

An image becomes 1..max_num tiles of image_size^2 on the grid whose aspect ratio is closest to the
image's (ties go to the larger grid when the image has enough pixels), plus a thumbnail of the
whole image last when there is more than one tile; bicubic resizing, ImageNet normalisation.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger images are rejected as likely decompression bombs


def load_image(source: str | Path | bytes | Image.Image, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, raw bytes or a PIL image; EXIF orientation applied."""
    if isinstance(source, Image.Image):
        image = source
        name = "PIL image"
    else:
        name = f"{len(source)} bytes" if isinstance(source, bytes) else str(source)
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise FileNotFoundError(f"image file {source} does not exist")
        try:
            image = Image.open(data)
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"image {name} is {image.width}x{image.height} = {image.width * image.height} pixels, "
                    f"over the limit of {max_pixels} (possible decompression bomb)"
                )
            image.load()
        except (OSError, Image.DecompressionBombError, SyntaxError) as e:
            raise ValueError(f"cannot read image {name}: {e}") from None
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, ordered by tile count."""
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, *, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
    """InternVL's rule: the closest aspect ratio; on a tie, the larger grid if the image fills over half of it."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_image(
    image: Image.Image, *, image_size: int = 448, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True
) -> list[Image.Image]:
    cols, rows = choose_grid(image.width, image.height, min_num=min_num, max_num=max_num, image_size=image_size)
    resized = np.asarray(image.resize((cols * image_size, rows * image_size), Image.BICUBIC))  # (rows*S, cols*S, 3)
    grid = resized.reshape(rows, image_size, cols, image_size, 3).transpose(0, 2, 1, 3, 4)  # (rows, cols, S, S, 3)
    tiles = [Image.fromarray(np.ascontiguousarray(t)) for t in grid.reshape(-1, image_size, image_size, 3)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def normalize(tiles: list[Image.Image]) -> torch.Tensor:
    """RGB tiles -> (N, 3, S, S) float32, ImageNet-normalised."""
    arr = np.stack([np.asarray(t, dtype=np.float32) for t in tiles]) / 255.0  # (N, S, S, 3)
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def image_to_tiles(
    source: str | Path | bytes | Image.Image, *, image_size: int = 448, max_num: int = 12, use_thumbnail: bool = True
) -> torch.Tensor:
    """Load, tile and normalise one image: (tiles, 3, image_size, image_size)."""
    return normalize(tile_image(load_image(source), image_size=image_size, max_num=max_num, use_thumbnail=use_thumbnail))
