"""Why the toy PRM cannot rank solutions: two measurements behind docs/results/alignment.md.

probe:    does a trained PRM's score for a step depend on the step? For held-out arithmetic questions it
          scores the reference solution and copies whose first addition is off by -1, +1, +2, or whose
          reading of the image is wrong, and prints the mean change of the perturbed step's P('+').
isolated: can the policy model learn to check an addition at all? It trains the model on one PRM turn
          ("a + b = c" in a user turn, '+'/'-' in the assistant slot; half the sums wrong) and measures
          the check with nothing before the turn, and with a system turn / an earlier turn / 20 filler
          tokens before it (the situation of every step in a real PRM conversation).

    python scripts/prm_diagnostics.py probe --prm runs/align/prm/final
    python scripts/prm_diagnostics.py isolated --model runs/demo/sft/final --steps 500
"""

from __future__ import annotations

import argparse
import random

import torch
from PIL import Image

from nativevl.data import images as img
from nativevl.data.toyworld.tasks import example
from nativevl.infer.prm import label_token_ids, step_scores
from nativevl.io.hf import load_model
from nativevl.io.tokenizer import load_tokenizer

PREFIXES = {
    "none": "",
    "system turn": "<|im_start|>system\ncheck each step.<|im_end|>\n",
    "earlier turn": "<|im_start|>user\nthe numbers are 1, 2 and 3.<|im_end|>\n<|im_start|>assistant\n+<|im_end|>\n",
    "20 filler tokens": " ".join(["the"] * 20) + "\n",
}


def probe(prm_dir: str, n: int) -> None:
    model = load_model(prm_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(prm_dir)
    size = model.config.vision.image_size
    changes: dict[str, list[float]] = {}
    for i in range(n):
        ex = example("arithmetic", 40000, i, size)
        tiles = img.image_to_tiles(Image.fromarray(ex.images[0]), image_size=size, max_num=1)
        steps = ex.answer.split("\n\n")
        lhs, rhs = steps[1].split(" = ")
        variants = {"reference": steps}
        for delta in (-1, 1, 2):
            variants[f"sum {delta:+d}"] = [steps[0], f"{lhs} = {int(rhs) + delta}", *steps[2:]]
        digits = steps[0].rstrip(".").split()
        digits[-1] = str((int(digits[-1]) + 3) % 10)
        variants["misread"] = [" ".join(digits) + ".", *steps[1:]]
        scores = step_scores(model, tok, ex.question, ["\n\n".join(v) for v in variants.values()], tiles, [1])
        ref = scores[0]
        for (name, _), s in zip(list(variants.items())[1:], scores[1:], strict=True):
            at = 0 if name == "misread" else 1
            changes.setdefault(name, []).append(s[at] - ref[at])
        if i < 3:
            for name, s in zip(variants, scores, strict=True):
                print(f"  q{i} {name:>9}: " + " ".join(f"{x:.3f}" for x in s))
    for name, c in changes.items():
        print(f"{name:>9}: mean change of the perturbed step's P('+') {sum(c) / len(c):+.4f} "
              f"(a checking PRM: strongly negative), n={len(c)}")


def isolated(model_dir: str, steps: int, lr: float, batch: int, seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = load_model(model_dir, dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    good, bad = label_token_ids(tok)

    def turn(prefix: str) -> tuple[list[int], int]:
        a, b = rng.randint(0, 27), rng.randint(0, 9)
        c = a + b if rng.random() < 0.5 else max(0, a + b + rng.choice([-3, -2, -1, 1, 2, 3]))
        text = prefix + f"<|im_start|>user\n{a} + {b} = {c}<|im_end|>\n<|im_start|>assistant\n"
        return tok(text, add_special_tokens=False).input_ids, int(c != a + b)

    def forward(rows: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i, _ in rows])
        mask = (ids != tok.pad_token_id).long()
        mask[:, -1] = 1
        logits = model(ids, None, attention_mask=mask).logits[:, -1][:, [good, bad]]
        return logits, torch.tensor([y for _, y in rows])

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        logits, y = forward([turn("") for _ in range(batch)])
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}, batch accuracy {(logits.argmax(-1) == y).float().mean():.3f}")
    model.eval()
    with torch.no_grad():
        for name, prefix in PREFIXES.items():
            right = sum(int(lg.argmax() == t) for lg, t in zip(*forward([turn(prefix) for _ in range(400)]), strict=True))
            print(f"check accuracy, {name} before the turn: {right / 400:.3f} (n=400, chance 0.5)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("probe")
    a.add_argument("--prm", required=True)
    a.add_argument("--n", type=int, default=50)
    b = sub.add_parser("isolated")
    b.add_argument("--model", required=True)
    b.add_argument("--steps", type=int, default=500)
    b.add_argument("--lr", type=float, default=3e-4)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.cmd == "probe":
        probe(args.prm, args.n)
    else:
        isolated(args.model, args.steps, args.lr, args.batch, args.seed)


if __name__ == "__main__":
    main()
