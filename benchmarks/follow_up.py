"""Time to first token of a conversation's turns about one image: nativevl's Engine with prefix reuse and
its vision cache (the default), with the vision cache only (prefix_cache=False), with neither, and
transformers' generate, same random weights, same prompts, one run.

Turn 1 asks about an image of --tiles tiles; every later turn carries the conversation so far (the image,
the questions, the answers) and asks one more question, as a chat client sends it. With neither cache
every turn runs the ViT on the image again and prefills the whole conversation; with the vision cache
only the first turn runs the ViT; with prefix reuse a later turn prefills only its new tokens (the last
answer's final token and the new question) on the keys the previous turn left. TTFT = prefill and first
token (the tiles are made beforehand, so preprocessing is in no side); transformers' is the wall time of
generate(max_new_tokens=1). Each turn's answer is the default engine's greedy answer (--answer-tokens),
so all sides prefill the same tokens.
    PYTHONPATH=src python3 benchmarks/follow_up.py [--shape internvl3_1b] [--device cpu|cuda] [--tiles 1]
        [--turns 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from decode import build  # benchmarks/decode.py, beside this script
from profiling import write_json

from nativevl.infer.engine import Engine, SamplingParams

GRIDS = {1: (1, 1), 3: (2, 1), 5: (2, 2), 7: (3, 2), 13: (4, 3)}  # tiles (with the thumbnail) -> columns, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="internvl3_1b", help="a preset name, or tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--tiles", type=int, default=None, choices=sorted(GRIDS), help="default: 13 on cuda, 1 on cpu")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tiles = args.tiles or (13 if cuda else 1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    import transformers

    cfg, theirs, ours = build(args.shape, args.device, dtype)
    print(f"{args.shape}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {args.device} {dtype}, "
          f"{tiles} tile(s) of {cfg.vision.image_size} px, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}")
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(10, cfg.image_token_id - 10, (n,), generator=g).tolist()
    pixels = torch.randn(tiles, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g).to(dtype)
    image = [cfg.image_token_id] * (tiles * cfg.image_seq_length)
    max_len = len(image) + args.turns * (args.question_tokens + args.answer_tokens) + 16
    kw = {"max_batch_size": 1, "max_seq_len": max_len, "cuda_graphs": cuda, "compile": False}  # TTFT: no decode compile
    sides = {"prefix": Engine(ours, None, **kw), "vision": Engine(ours, None, prefix_cache=False, **kw),
             "neither": Engine(ours, None, vision_cache_mb=0, prefix_cache=False, **kw)}
    params = SamplingParams(max_tokens=args.answer_tokens, ignore_eos=True)

    def ask(engine: Engine, ids: list[int], key: str | None):
        req = engine.submit(ids, params, pixels, image_keys=[key] if key else None,
                            tiles_per_image=[tiles] if key else None)
        while not req.done:
            engine.step()
        sync()
        return req.timings["first_token"] - req.timings["submitted"], req.result()[0].token_ids

    def theirs_ttft(ids: list[int]) -> tuple[float, int]:
        x = torch.tensor([ids], device=args.device)
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            out = theirs.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pixels.to(args.device),
                                  max_new_tokens=1, do_sample=False, pad_token_id=0)
            sync()
        return time.perf_counter() - t0, int(out[0, -1])

    warm = text(8) + image + text(8)  # first-call costs (allocations, kernels) on every side, another image key
    for name, engine in sides.items():
        ask(engine, warm, None if name == "neither" else "warm-up")
    theirs_ttft(warm)
    rows, ids = [], text(4) + image
    names = [*sides, "transformers"]

    def save(summary: dict) -> None:  # after every turn: a run cut short keeps what it measured
        if args.json:
            write_json(args.json, {"shape": args.shape, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
                                   "tiles": tiles, "torch": torch.__version__, "transformers": transformers.__version__,
                                   "turns": rows, "later_turns_mean_ms": summary})
    for turn in range(1, args.turns + 1):
        ids = ids + text(args.question_tokens)
        row: dict = {"turn": turn, "prompt_tokens": len(ids)}
        answers = {}
        for name, engine in sides.items():
            hits = engine.stats["prefix_tokens"]
            t, answers[name] = ask(engine, ids, None if name == "neither" else "the image")
            row[f"{name}_ms"] = 1e3 * t
            row[f"{name}_reused_tokens"] = engine.stats["prefix_tokens"] - hits
        t_theirs, first = theirs_ttft(ids)
        row["transformers_ms"] = 1e3 * t_theirs
        answer = answers["prefix"]
        row["same_answers"] = all(a == answer for a in answers.values())
        row["same_first_token"] = answer[0] == first
        rows.append(row)
        print(f"turn {turn}: {len(ids)} prompt tokens ({row['prefix_reused_tokens']} reused); TTFT "
              + ", ".join(f"{n} {row[n + '_ms']:.1f} ms ({row[n + '_ms'] / row['prefix_ms']:.2f}x)" for n in names)
              + f"; the same answers on our sides: {row['same_answers']}, the same first token as transformers: "
              f"{row['same_first_token']}")
        ids = ids + answer
        save({})
    later = rows[1:]
    summary = {}
    if later:
        summary = {n: statistics.mean(r[f"{n}_ms"] for r in later) for n in names}
        print(f"turns 2-{args.turns}, mean TTFT: "
              + ", ".join(f"{n} {summary[n]:.1f} ms ({summary[n] / summary['prefix']:.2f}x)" for n in names))
    save(summary)

if __name__ == "__main__":
    main()
