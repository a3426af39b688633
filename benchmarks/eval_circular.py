"""Evaluation of a circular benchmark file (MMBench's format: every question once more per rotation of its
options, the rotations showing the question's picture): nativevl's `predict`, which tiles a picture and
runs the ViT on it once per batch, and `predict_engine` (`nativevl eval --engine`: continuous batching,
CUDA graphs on a GPU, the vision cache across batches), against the same prompts each with its own tiles
(nativevl's generate_texts, the path before sharing) and transformers' generate on those batches; same
random weights, same prompts and batch size, one run.

A TSV in MMBench's layout is written to a temporary folder (--questions questions, --rotations rows each,
random pictures of --picture px, tiled with --max-num as `nativevl eval --max_num`), read by nativevl's
file task, and asked in its order (each question's rows together). Every side's time includes making
the tiles from the decoded pictures and the prompts' token ids (transformers' side uses our tiles and
ids: its processor is not timed); greedy, --new-tokens per row. Answers are compared as token ids.
    PYTHONPATH=src python3 benchmarks/eval_circular.py [--shape internvl3_1b] [--device cpu|cuda]
        [--questions 4] [--rotations 4] [--max-num 1] [--batch-size 8] [--new-tokens 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from decode import build  # benchmarks/decode.py, beside this script
from PIL import Image
from profiling import write_json

from nativevl.data.processor import chat_inputs, pad_batch
from nativevl.eval.runner import predict, predict_engine
from nativevl.eval.tasks import get_task
from nativevl.infer.generate import generate_texts
from nativevl.io.tokenizer import IMG_CONTEXT, train_tokenizer

ANIMALS = ["cat", "dog", "cow", "hen", "fox", "owl"]


class IdsTokenizer:
    """The tokenizer, but answers decode to their token ids (a random model's tokens beyond the tokenizer's
    vocabulary would decode to nothing and hide a difference)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.pad_token_id = tokenizer, tokenizer.pad_token_id

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):  # the rest (the engine's end tokens) as the tokenizer has them
        return getattr(self.tokenizer, name)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def write_mmbench(path: Path, questions: int, rotations: int, side: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    letters = "ABCDEF"[:rotations]
    rows = []
    for k in range(rotations):  # as MMBench's files are sorted: the questions, then each further rotation
        for q in range(questions):
            options = ANIMALS[:rotations][k:] + ANIMALS[:rotations][:k]
            row = {"index": q + k * 1_000_000, "question": f"Which animal is in picture {q}?",
                   "answer": letters[options.index(ANIMALS[q % rotations])], "image": str(q), "category": "animals"}
            if k == 0:
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (side[1], side[0], 3), dtype=np.uint8)).save(buf, format="PNG")
                row["image"] = base64.b64encode(buf.getvalue()).decode()
            row.update(zip(letters, options))
            rows.append(row)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="internvl3_1b", help="a preset name, or tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--rotations", type=int, default=4, choices=range(2, 7))
    ap.add_argument("--max-num", type=int, default=1, help="tiles per picture at most (with the thumbnail)")
    ap.add_argument("--picture", default="800x600", help="WIDTHxHEIGHT of the pictures")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "MMBench_DEV_EN.tsv"
        write_mmbench(path, args.questions, args.rotations, tuple(int(x) for x in args.picture.split("x")))
        task = get_task(str(path), max_num=args.max_num)
        items = task.load(None, 0)
        prompts = [task.prompt(items[i]) for group in task.groups(items) for i in group]
        corpus = [m[0]["content"] for m, _ in prompts]
    tokenizer = train_tokenizer(corpus * 20, vocab_size=400)
    ids_tok = IdsTokenizer(tokenizer)
    cfg, theirs, ours = build(args.shape, args.device, dtype,
                              image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    size, seq = cfg.vision.image_size, cfg.image_seq_length
    print(f"{args.shape}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {args.device} {dtype}, "
          f"{len(prompts)} rows ({args.questions} questions x {args.rotations} rotations), pictures {args.picture} "
          f"at max_num {args.max_num}, batches of {args.batch_size}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}")

    def shared(asked):
        return predict(ours, ids_tok, asked, max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                       system_message=None, max_num=task.tile_cap, progress=False)

    kept: dict = {}  # one engine for the warm-up and the timed call: its compiled step and graphs are not timed

    def engine(asked):
        return predict_engine(ours, ids_tok, asked, max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                              system_message=None, max_num=task.tile_cap, progress=False, reuse=kept)

    def own_rows(asked):
        return [chat_inputs(tokenizer, m, ims, image_size=size, image_seq_length=seq, max_num=task.tile_cap(len(ims)))
                for m, ims in asked]

    def unshared(asked):
        return generate_texts(ours, ids_tok, own_rows(asked), batch_size=args.batch_size,
                              max_new_tokens=args.new_tokens, progress=False)

    def transformers_side(asked):
        rows, answers = own_rows(asked), []
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start: start + args.batch_size]
            x, mask = pad_batch([r[0] for r in chunk], tokenizer.pad_token_id, side="left")
            with torch.no_grad():
                out = theirs.generate(input_ids=x.to(args.device), attention_mask=mask.to(args.device),
                                      pixel_values=torch.cat([r[1] for r in chunk]).to(args.device, dtype),
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers += [" ".join(map(str, r[x.shape[1]:].tolist())) for r in out]
        return answers

    sides = {"shared": shared, "engine": engine, "unshared": unshared, "transformers": transformers_side}
    for name, fn in sides.items():  # first-call costs on every side; the engine's at every batch it will run
        fn(prompts if name == "engine" else prompts[:2])
    kept["engine"].refresh_weights()  # its vision cache and kept prefixes would skip the timed call's work
    times, answers = {}, {}
    info = {"shape": args.shape, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
            "rows": len(prompts), "questions": args.questions, "rotations": args.rotations,
            "max_num": args.max_num, "picture": args.picture, "batch_size": args.batch_size,
            "new_tokens": args.new_tokens, "torch": torch.__version__, "transformers": transformers.__version__}
    for name, fn in sides.items():
        sync()
        t0 = time.perf_counter()
        answers[name] = fn(prompts)
        sync()
        times[name] = time.perf_counter() - t0
        print(f"  {name}: {times[name]:.1f} s")
        if args.json:  # after each side: a run cut short keeps what it measured
            write_json(args.json, {**info, "seconds": times})
    tiles = sum(chat_inputs(tokenizer, m, ims, image_size=size, image_seq_length=seq,
                            max_num=task.tile_cap(len(ims)))[1].shape[0] for m, ims in prompts[: args.rotations])
    same = sum(a == b for a, b in zip(answers["shared"], answers["unshared"]))
    same_e = sum(a == b for a, b in zip(answers["engine"], answers["unshared"]))
    same_t = sum(a.split()[:1] == b.split()[:1] for a, b in zip(answers["unshared"], answers["transformers"]))
    print(f"tiles per question: {tiles // args.rotations}; rows/s: "
          + ", ".join(f"{k} {len(prompts) / t:.2f}" for k, t in times.items()))
    print("wall: " + ", ".join(f"{k} {t:.1f} s ({t / times['shared']:.2f}x shared's)" for k, t in times.items()))
    print(f"same answers as unshared: shared {same}, engine {same_e} of {len(prompts)}; same first token unshared / "
          f"transformers: {same_t} of {len(prompts)}")
    if args.json:
        write_json(args.json, {**info, "seconds": times, "same_answers": same, "engine_same_answers": same_e,
                               "same_first_token_as_transformers": same_t})

if __name__ == "__main__":
    main()
