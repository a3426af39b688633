"""The engine's host time per generated token, without the model: what the CPU spends between decode steps.

Each Engine decode call is replaced by an instant stub returning random tokens, so what is timed is
the engine's own Python per token (stop checks, streaming, bookkeeping), the work a GPU waits for
between graph replays. Compared side by side in one run: the text grown a few tokens at a time
(`sampling.grow_text`, the engine's) against decoding the whole sample at every token (what the
engine did before, and what a streamer that re-decodes does), with streaming and/or stop strings on.
The tokenizer is a byte-level BPE trained here (no hub download); a real one's decode costs differ.
The time per token includes each request's prefill (a 16-token prompt on the tiny model, once per request).
    PYTHONPATH=src python3 benchmarks/engine_host.py [--new-tokens 2000] [--batch-sizes 1,32] [--json OUT]
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch
from profiling import write_json  # benchmarks/profiling.py, beside this script

from nativevl import VisionLanguageModel
from nativevl.config import preset
from nativevl.infer import engine as engine_module
from nativevl.infer.engine import Engine, SamplingParams
from nativevl.io.tokenizer import train_tokenizer

OURS = engine_module.grow_text
CORPUS = ["the quick brown fox jumps over the lazy dog", "naïve café déjà vu, wörld", "東京 and 🎉 emoji"] * 50


def whole_decode(tokenizer, seq) -> str:
    """The peer: the whole sample decoded again at every token."""
    seq.text = tokenizer.decode(seq.tokens, skip_special_tokens=True).rstrip("\ufffd")
    return seq.text


def host_us_per_token(engine: Engine, batch: int, new_tokens: int, stream: bool, stop: tuple[str, ...]) -> float:
    rng = random.Random(0)
    vocab = range(len(engine.tokenizer.get_added_vocab()), len(engine.tokenizer))  # ordinary tokens (added ones first)

    def instant_step(inputs, rows, window, steps):
        return None, torch.tensor([[rng.choice(vocab) for _ in range(rows)] for _ in range(steps)])

    engine.decoder.run = instant_step
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, stop=stop)
    for _ in range(batch):
        engine.submit([20, 21, 22, 23] * 4, params, on_event=(lambda *a: None) if stream else None)
    started = time.perf_counter()
    while engine.step():
        pass
    return (time.perf_counter() - started) / (batch * new_tokens) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=2000)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tokenizer = train_tokenizer(CORPUS, vocab_size=512)
    torch.manual_seed(0)
    model = VisionLanguageModel(preset("tiny"))
    rows = []
    warm = Engine(model, tokenizer, max_batch_size=1, max_seq_len=128, cuda_graphs=False, prefix_cache=False)
    host_us_per_token(warm, 1, 64, True, ("zzq",))  # one-time costs (the first prefill's) out of the first row
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.new_tokens} new tokens")
    print(f"{'batch':>5} {'streamed':>8} {'stop':>5} {'grown (ours)':>13} {'whole decode':>13} {'ratio':>6}   (us of host time per token)")
    for batch in map(int, args.batch_sizes.split(",")):
        for stream, stop in ((False, ()), (True, ()), (False, ("zzq",)), (True, ("zzq",))):
            figures = {}
            for name, grow in (("grown", OURS), ("whole", whole_decode)):
                engine_module.grow_text = grow
                try:
                    engine = Engine(model, tokenizer, max_batch_size=batch, max_seq_len=args.new_tokens + 64,
                                    cuda_graphs=False, prefix_cache=False)
                    figures[name] = host_us_per_token(engine, batch, args.new_tokens, stream, stop)
                finally:
                    engine_module.grow_text = OURS
            ratio = figures["whole"] / figures["grown"]
            rows.append({"batch": batch, "stream": stream, "stop": bool(stop), "grown_us": figures["grown"],
                         "whole_us": figures["whole"], "ratio": ratio})
            print(f"{batch:>5} {stream!s:>8} {bool(stop)!s:>5} {figures['grown']:>13.1f} {figures['whole']:>13.1f} "
                  f"{ratio:>5.1f}x")
    if args.json:
        write_json(args.json, {"new_tokens": args.new_tokens, "rows": rows})


if __name__ == "__main__":
    main()
