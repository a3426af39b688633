"""Ours vs transformers' InternVLForConditionalGeneration, same weights, same inputs, same process.

Measures a prefill forward (images + text) and greedy generation, prints times and ratios.
    python benchmarks/forward_generate.py [--preset small|internvl3_1b] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from nativevl import VisionLanguageModel
from nativevl.config import preset
from nativevl.infer.generate import generate
from nativevl.io.hf_config import config_to_hf


def small_config():
    """A CPU-sized model with the real structure: 448px tiles (256 tokens each), 4 ViT + 4 LLM layers."""
    cfg = preset("internvl3_1b")
    vision = dataclasses.replace(cfg.vision, num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=4)
    text = dataclasses.replace(cfg.text, num_hidden_layers=4, vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return dataclasses.replace(cfg, vision=vision, text=text, image_token_id=31999)


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tiles", type=int, default=2)
    ap.add_argument("--text", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = small_config() if args.preset == "small" else preset(args.preset)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    theirs = InternVLForConditionalGeneration(InternVLConfig(**config_to_hf(cfg))).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = VisionLanguageModel.from_pretrained(tmp, dtype=dtype, device=args.device)
    theirs = theirs.to(device=args.device, dtype=dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    n_img = args.tiles * cfg.image_seq_length
    ids = torch.randint(0, cfg.image_token_id, (1, args.text + n_img), device=args.device)
    ids[0, 8 : 8 + n_img] = cfg.image_token_id
    pv = torch.randn(args.tiles, 3, cfg.vision.image_size, cfg.vision.image_size, device=args.device, dtype=dtype)
    mask = torch.ones_like(ids)

    rows = []
    with torch.no_grad():
        t_hf = timed(lambda: theirs(input_ids=ids, pixel_values=pv, attention_mask=mask, logits_to_keep=1), args.repeats, sync)
        t_us = timed(lambda: ours(input_ids=ids, pixel_values=pv, logits_to_keep=1), args.repeats, sync)
        rows.append(("prefill forward", t_hf, t_us))
        never = cfg.text.vocab_size + 1
        t_hf = timed(lambda: theirs.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, max_new_tokens=args.new_tokens,
                                             do_sample=False, eos_token_id=never, pad_token_id=0), args.repeats, sync)
        t_us = timed(lambda: generate(ours, ids, pv, max_new_tokens=args.new_tokens, eos_token_id=never), args.repeats, sync)
        rows.append((f"generate {args.new_tokens} tokens", t_hf, t_us))
    print(f"preset={args.preset} device={args.device} dtype={args.dtype} tiles={args.tiles} "
          f"prompt={ids.shape[1]} tokens, torch {torch.__version__}")
    print(f"{'':24s} {'transformers':>13s} {'nativevl':>10s} {'speed-up':>9s}")
    for name, a, b in rows:
        print(f"{name:24s} {a * 1e3:11.1f}ms {b * 1e3:8.1f}ms {a / b:8.2f}x")


if __name__ == "__main__":
    main()
