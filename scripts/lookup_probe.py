"""Which form of the multi-image lookup can the demo's language model learn, and how fast?

The multi-image question ("Image-1: <image>\\nImage-2: <image>\\n... which image shows the red circle?")
needs the model to find the picture that matches the question and answer with its number. This script
takes the pictures away and trains a freshly initialised LLM of the demo's shape (4 blocks, 128 wide,
RoPE base 1e4) on the same structure in embeddings: 5-8 items, each an "Image k :" prefix and one item
vector (the object: colour + shape), then `queries` questions "which <colour> <shape> ?" with the loss on
the answer. It prints loss and accuracy of the first question of each list every 100 steps (chance about
1/6.5). Two choices make the difference (docs/demo/multi_image.md has the figures):

  --label text   the number only in the "Image k :" prefix (the item must fetch it: two attention steps)
  --label item   the number also added into the item vector, as a number drawn on the object puts it
                 into the object's visual token
  --item_keys own      the item's colour / shape vectors are not the words' embeddings (as a picture's
                       features are not): the match between question and item must be learnt
  --answer label       the answer is the number, right after "?"
  --answer key_label   the answer first repeats the key ("<colour> <shape>", loss on it too), then
                       `--gap` filler words, then the number

    python scripts/lookup_probe.py --label text --answer label --steps 6000     # the old task's form
    python scripts/lookup_probe.py --colour_only --label item --answer key_label --queries 4   # the demo's
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from nativevl.demo import text_config
from nativevl.model.text import TextModel

COLOURS, SHAPES = 8, 5
# token ids: 0 pad, 1 "Image", 2 ":", 3 "\n", 4 "which", 5 "?", 6-9 filler words, 10 + k labels,
# 30 + c colours, 40 + s shapes
VOCAB = 64


def build(args, model: TextModel, pictures: torch.nn.Embedding, gen: torch.Generator) -> tuple[torch.Tensor, list, list]:
    """Input embeddings (B, T, C), answer slots [(row, position, target, first)] for the number and the key."""
    E = model.embed_tokens.weight
    K = pictures.weight if args.item_keys == "own" else E  # what an item's colour / shape looks like
    rows, number_slots, key_slots = [], [], []
    for b in range(args.batch):
        n = int(torch.randint(5, 9, (1,), generator=gen))
        keys = torch.randperm(COLOURS if args.colour_only else COLOURS * SHAPES, generator=gen)[:n].tolist()
        words = [[30 + k] if args.colour_only else [30 + k // SHAPES, 40 + k % SHAPES] for k in keys]
        seq = []
        for i, w in enumerate(words):
            item = sum(K[t] for t in w) + (E[10 + i] if args.label == "item" else 0)
            seq += [E[1], E[10 + i], E[2], item, E[3]]
        for q in range(args.queries):
            t = int(torch.randint(0, n, (1,), generator=gen))
            seq += [E[4], *(E[x] for x in words[t]), E[5]]
            if args.answer == "key_label":
                for x in words[t]:
                    key_slots.append((b, len(seq) - 1, x, q == 0))
                    seq.append(E[x])
                seq += [E[6 + j] for j in range(args.gap)]
            number_slots.append((b, len(seq) - 1, 10 + t, q == 0))
            seq.append(E[10 + t])
        rows.append(torch.stack(seq))
    width = max(len(r) for r in rows)
    x = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])
    return x, number_slots, key_slots


def scored(hidden: torch.Tensor, head: torch.nn.Module, slots: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = torch.tensor([(b, p, t) for b, p, t, _ in slots])
    logits = head(hidden[s[:, 0], s[:, 1]])
    return logits, s[:, 2], torch.tensor([f for *_, f in slots])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init_std", type=float, default=0.02)
    ap.add_argument("--label", choices=("text", "item"), default="text")
    ap.add_argument("--answer", choices=("label", "key_label"), default="label")
    ap.add_argument("--gap", type=int, default=0, help="filler words between the repeated key and the number")
    ap.add_argument("--item_keys", choices=("shared", "own"), default="shared",
                    help="an item's key as the word's own embedding, or a separate one (as a picture's features are)")
    ap.add_argument("--queries", type=int, default=1, help="questions per item list, each with its loss")
    ap.add_argument("--colour_only", action="store_true", help="one-token keys (a colour alone)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 0 <= args.gap <= 4:
        raise SystemExit("--gap takes 0 to 4 filler words")

    torch.manual_seed(args.seed)
    cfg = text_config(VOCAB, eos_token_id=3, pad_token_id=0)
    model, head = TextModel(cfg), torch.nn.Linear(cfg.hidden_size, VOCAB, bias=False)
    pictures = torch.nn.Embedding(VOCAB, cfg.hidden_size)
    params = list(model.parameters()) + list(head.parameters()) + list(pictures.parameters())
    for p in params:
        if p.dim() > 1:
            torch.nn.init.normal_(p, 0.0, args.init_std)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    started, window = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        x, number_slots, key_slots = build(args, model, pictures, gen)
        hidden = model(x, torch.arange(x.shape[1], dtype=torch.float32).expand(x.shape[:2]))
        logits, target, first = scored(hidden, head, number_slots)
        loss = F.cross_entropy(logits, target)
        key_acc = float("nan")
        if key_slots:
            key_logits, key_target, _ = scored(hidden, head, key_slots)
            loss = loss + F.cross_entropy(key_logits, key_target)
            key_acc = (key_logits.argmax(-1) == key_target).float().mean().item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            window.append(((logits[first].argmax(-1) == target[first]).float().mean().item(),
                           F.cross_entropy(logits[first], target[first]).item(), key_acc))
        if step % 100 == 0:
            acc, number_loss, keys = (sum(w[i] for w in window) / len(window) for i in range(3))
            print(f"step {step}: number loss {number_loss:.3f}, accuracy {acc:.3f}"
                  + ("" if math.isnan(keys) else f", key repeated {keys:.3f}")
                  + f" (last 100 steps), {time.perf_counter() - started:.0f} s", flush=True)
            window = []


if __name__ == "__main__":
    main()
