"""LoRA and QLoRA fine-tuning of the demo's pre-trained model on the demo's SFT mixture, side by side:
the same steps, learning rate, data order and adapters (rank 16, alpha 32 on the LLM's seven linear layers
per block, MLP trained in full, ViT frozen: the sft_lora / sft_qlora policies), the QLoRA run's LLM layers
stored in NF4 with double quantization. scripts/qlora.sh runs it and evaluates the results.

usage: python scripts/qlora.py --demo runs/demo --out runs/qlora [--steps 2200]"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nativevl.demo import DemoConfig, train_stage
from nativevl.io.hf import load_model
from nativevl.io.tokenizer import load_tokenizer
from nativevl.train.stages import ModulePolicy, StagePolicy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo", help="a `make demo` output folder (its pretrain/final is the base)")
    p.add_argument("--out", default="runs/qlora")
    p.add_argument("--steps", type=int, default=DemoConfig().sft_steps)
    args = p.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    cfg = DemoConfig(sft_steps=args.steps)
    tokenizer = load_tokenizer(demo / "tokenizer")
    times = {}
    for mode in ("lora", "qlora"):
        if (out / mode / "final").is_dir():
            print(f"[qlora] {mode}: already trained in {out / mode}")
            continue
        policy = StagePolicy(vit=ModulePolicy("frozen"), mlp=ModulePolicy("full"), llm=ModulePolicy(mode))
        torch.manual_seed(cfg.train_seed)
        model = load_model(demo / "pretrain" / "final", dtype=torch.float32)  # its source_path: the adapter's base
        print(f"[qlora] {mode}: {args.steps} steps from {demo / 'pretrain' / 'final'} -> {out / mode}")
        started = time.perf_counter()
        train_stage(mode, model, tokenizer, cfg, out, args.steps, text_ratio=None, policy=policy, sources="sft")
        times[mode] = round(time.perf_counter() - started, 1)
    if times:
        path = out / "times.json"
        earlier = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**earlier, **times}, indent=2) + "\n")
        print(f"[qlora] seconds per run: {times}")


if __name__ == "__main__":
    main()
