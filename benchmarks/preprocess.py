"""Images per second: our tiling pipeline vs transformers' GotOcr2ImageProcessorPil (InternVL settings).

Same 200 mixed-size images, same process, one after the other; prints both rates and the ratio.
    python benchmarks/preprocess.py [--n 200] [--max_side 1600] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import internvl_image_processor

from nativevl.data.images import choose_grid, image_to_tiles


def resizes_only(im: Image.Image) -> None:
    cols, rows = choose_grid(im.width, im.height)
    im.resize((cols * 448, rows * 448), Image.BICUBIC)
    if cols * rows > 1:
        im.resize((448, 448), Image.BICUBIC)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max_side", type=int, default=1600)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sizes = rng.integers(64, args.max_side, size=(args.n, 2))
    images = [Image.fromarray(rng.integers(0, 255, (int(h), int(w), 3), dtype=np.uint8)) for w, h in sizes]
    theirs = internvl_image_processor()
    tiles = sum(image_to_tiles(im).shape[0] for im in images)

    def run(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for im in images:
                fn(im)
            best = min(best, time.perf_counter() - t0)
        return best

    t_theirs = run(lambda im: theirs(images=im, return_tensors="pt"))
    t_ours = run(image_to_tiles)
    t_raw = run(lambda im: image_to_tiles(im, normalized=False))
    t_resize = run(lambda im: resizes_only(im))
    print(f"{args.n} images ({tiles} tiles of 448x448), sides 64..{args.max_side}, 1 thread, best of {args.repeats}")
    print(f"transformers GotOcr2ImageProcessorPil (float32 out): {args.n / t_theirs:7.1f} images/s")
    print(f"nativevl image_to_tiles (float32 out):               {args.n / t_ours:7.1f} images/s  {t_theirs / t_ours:.2f}x")
    print(f"nativevl image_to_tiles (uint8 out, model normalises): {args.n / t_raw:5.1f} images/s  {t_theirs / t_raw:.2f}x")
    print(f"PIL bicubic resizes alone (shared by both, the floor): {args.n / t_resize:5.1f} images/s  "
          f"{t_theirs / t_resize:.2f}x")


if __name__ == "__main__":
    main()
