"""Can the demo's language model learn the lookup behind the multi-image task, in text alone?

The multi-image question ("Image-1: <image>\\nImage-2: <image>\\n... which image shows the red circle?")
needs the model to find the item that matches the question and answer with the label written before
it: an induction-style lookup. This script takes the visual part away: a freshly initialised LLM of the
demo's shape (4 blocks, 128 wide, RoPE base 1e4) is trained on token lists

    Image k : <colour> [<shape>] \\n   (5-8 items, distinct keys)   which <colour> [<shape>] ?   -> k

with the loss on the answer only, and prints the loss and batch accuracy every 100 steps (chance about
1/6.5). docs/demo/multi_image.md has what it showed.

    python scripts/lookup_probe.py --steps 6000                  # colour + shape keys, as the task
    python scripts/lookup_probe.py --steps 6000 --colour_only    # one-token keys
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F

from nativevl.demo import text_config
from nativevl.model.text import TextModel

COLOURS, SHAPES = 8, 5
# token ids: 0 pad, 1 "Image", 2 ":", 3 "\n", 4 "which", 5 "?", 10 + k labels, 30 + c colours, 40 + s shapes
VOCAB = 64


def key_tokens(key: int, colour_only: bool) -> list[int]:
    return [30 + key] if colour_only else [30 + key // SHAPES, 40 + key % SHAPES]


def batch(size: int, colour_only: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, answers = [], []
    for _ in range(size):
        n = int(torch.randint(5, 9, (1,), generator=gen))
        keys = torch.randperm(COLOURS if colour_only else COLOURS * SHAPES, generator=gen)[:n].tolist()
        row = []
        for i, k in enumerate(keys):
            row += [1, 11 + i, 2, *key_tokens(k, colour_only), 3]
        target = int(torch.randint(0, n, (1,), generator=gen))
        rows.append(row + [4, *key_tokens(keys[target], colour_only), 5])
        answers.append(11 + target)
    ids = torch.zeros(size, max(map(len, rows)), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) - 1 for r in rows]), torch.tensor(answers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init_std", type=float, default=0.02)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--colour_only", action="store_true", help="one-token keys (a plain induction lookup)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    cfg = dataclasses.replace(text_config(VOCAB, eos_token_id=3, pad_token_id=0), num_hidden_layers=args.layers)
    model, head = TextModel(cfg), torch.nn.Linear(cfg.hidden_size, VOCAB, bias=False)
    params = list(model.parameters()) + list(head.parameters())
    for p in params:
        if p.dim() > 1:
            torch.nn.init.normal_(p, 0.0, args.init_std)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    started, window = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        ids, last, answers = batch(args.batch, args.colour_only, gen)
        positions = torch.arange(ids.shape[1], dtype=torch.float32).expand_as(ids)
        logits = head(model(model.embed_tokens(ids), positions)[torch.arange(len(ids)), last])
        loss = F.cross_entropy(logits, answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(((logits.argmax(-1) == answers).float().mean().item(), loss.item()))
        if step % 100 == 0:
            acc = sum(a for a, _ in window) / len(window)
            mean_loss = sum(x for _, x in window) / len(window)
            print(f"step {step}: loss {mean_loss:.3f}, accuracy {acc:.3f} (last 100 steps), "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            window = []


if __name__ == "__main__":
    main()
