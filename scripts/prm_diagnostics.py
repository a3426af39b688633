"""Why the toy PRM cannot rank solutions: two measurements behind docs/results/alignment.md.

probe:    does a trained PRM's score for a step depend on the step? For held-out arithmetic questions it
          scores the reference solution and copies whose first addition is off by -1, +1, +2, or whose
          reading of the image is wrong, and prints the mean change of the perturbed step's P('+').
isolated: can the policy model learn to check an addition at all? It trains the model on one PRM turn
          ("a + b = c" in a user turn, '+'/'-' in the assistant slot; half the sums wrong) and measures
          the check with nothing before the turn, and with a system turn / an earlier turn / 20 filler
          tokens before it (the situation of every step in a real PRM conversation).

sums:     does a model predict the true partial sum after ' =' inside the PRM conversation (steps in
          user turns), as it does in its own answer? (The SFT policy: 61/84 in its answer, 12/84 there.)
labels:   how the Monte Carlo step labels of `nativevl data prm` files compare with exact labels (a
          step is right when the solution so far equals the generator's reference), the kind of each
          solution's first error; --write DIR writes the same solutions with the exact labels.
rank:     how PRMs order the policy's own samples: 8 samples (T 0.7) per validation question, the share of
          (right, wrong) pairs of one question where the right one scores higher, and Best-of-8 by the
          mean / min / last step score.
synthetic: trains a PRM (optionally grown by --grow identity blocks, optionally with the step-text
          loss --step_lm) on solutions with one perturbed addition and exact labels (or on the PRM files
          of --data), with a two-way '+'/'-' cross-entropy on the label slots only, then measures how
          often a held-out right solution scores above a wrong one of the same question.

    python scripts/prm_diagnostics.py probe --prm runs/align/prm/final
    python scripts/prm_diagnostics.py isolated --model runs/demo/sft/final --steps 500
    python scripts/prm_diagnostics.py sums --model runs/demo/sft/final
    python scripts/prm_diagnostics.py labels runs/align/prm600:30000 runs/align/prm2400:31000 --write runs/align/prm3000_exact
    python scripts/prm_diagnostics.py rank --model runs/demo/sft/final --prm runs/align/prm_obj_mc/final runs/align/prm_custom_exact2
    python scripts/prm_diagnostics.py synthetic --model runs/demo/sft/final --grow 2 --step_lm 1 --steps 1500
    python scripts/prm_diagnostics.py synthetic --model runs/demo/sft/final --grow 2 --step_lm 1 --steps 1500 \
        --data runs/align/prm3000_exact/prm600.jsonl runs/align/prm3000_exact/prm2400.jsonl --save runs/align/prm_custom_exact
    python scripts/prm_diagnostics.py synthetic --model runs/demo/sft/final --grow 2 --step_lm 1 --steps 1500 \
        --data runs/align/prm600/prm.jsonl runs/align/prm2400/prm.jsonl --save runs/align/prm_custom_mc
"""

from __future__ import annotations

import argparse
import random

import torch
from PIL import Image

import json
import re
from collections import Counter
from pathlib import Path

import torch.nn.functional as F

from nativevl.data import images as img
from nativevl.data.processor import pad_batch
from nativevl.data.template import encode_conversation
from nativevl.data.toyworld.tasks import example
from nativevl.infer.prm import encode_for_scoring, label_token_ids, step_scores
from nativevl.io.hf import load_model, save_model
from nativevl.io.parts import grow_llm_depth
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
        tiles = _tiles(ex, size)
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


def _tiles(ex, size: int) -> torch.Tensor:
    return img.image_to_tiles(Image.fromarray(ex.images[0]), image_size=size, max_num=1)


def sums(model_dir: str, n: int) -> None:
    model = load_model(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir)
    size, length = model.config.vision.image_size, model.config.image_seq_length
    (eq,) = tok(" =", add_special_tokens=False).input_ids
    hits = {"PRM conversation": [0, 0], "the policy's answer": [0, 0]}
    for i in range(n):
        ex = example("arithmetic", 40000, i, size)
        tiles = _tiles(ex, size)
        prm_ids, _ = encode_for_scoring(tok, ex.question, ex.answer.split("\n\n"), [1], length)
        own_ids, _ = encode_conversation(tok, [{"from": "human", "value": ex.question}, {"from": "gpt", "value": ex.answer}],
                                         tiles_per_image=[1], image_seq_length=length, system_message=None)
        for name, ids in (("PRM conversation", prm_ids), ("the policy's answer", own_ids)):
            with torch.no_grad():
                guess = model(torch.tensor([ids]), tiles).logits[0].argmax(-1).tolist()
            for p in range(len(ids) - 1):
                if ids[p] == eq:
                    hits[name][0] += int(guess[p] == ids[p + 1])
                    hits[name][1] += 1
    for name, (right, total) in hits.items():
        print(f"true partial sum predicted after ' =' in {name}: {right}/{total}")


def _steps_of(record: dict) -> list[str]:
    conv = record["conversations"]
    return [conv[1]["value"].split("### Solution Process:\n", 1)[1]] + [t["value"] for t in conv[3::2]]


def labels(folders: list[str], write: str | None) -> None:
    kinds, agree = Counter(), Counter()
    meta = {}
    for spec in folders:
        folder, seed = spec.rsplit(":", 1)
        out_lines = []
        for line in Path(folder, "prm.jsonl").read_text().splitlines():
            record = json.loads(line)
            q = int(re.search(r"q(\d+)-", record["image"]).group(1))
            ref = [s.strip() for s in example("arithmetic", int(seed), q).answer.split("\n\n")]
            steps, right = _steps_of(record), True
            exact = []
            for k, step in enumerate(steps):
                right = right and k < len(ref) and step.strip() == ref[k]
                exact.append("+" if right else "-")
            for k, label in enumerate(exact):
                agree[(label, record["conversations"][2 + 2 * k]["value"])] += 1
                record["conversations"][2 + 2 * k]["value"] = label
            first = next((k for k, e in enumerate(exact) if e == "-"), None)
            m = re.match(r"(\d+) \+ (\d+) = (\d+)$", steps[first].strip()) if first else None
            kinds["right" if first is None else "misread numbers" if first == 0 else
                  "wrong sum" if m and int(m[1]) + int(m[2]) != int(m[3]) else "other"] += 1
            record["image"] = str(Path(folder, record["image"]).resolve())
            out_lines.append(json.dumps(record))
        if write:
            Path(write).mkdir(parents=True, exist_ok=True)
            name = Path(folder).name
            Path(write, f"{name}.jsonl").write_text("\n".join(out_lines) + "\n")
            meta[name] = {"root": "", "annotation": str(Path(write, f"{name}.jsonl").resolve()), "max_dynamic_patch": 1}
    print("solutions by first error:", dict(kinds))
    for exact in "+-":
        n = agree[(exact, "+")] + agree[(exact, "-")]
        print(f"steps exactly {exact!r}: {n}, Monte Carlo '+' for {agree[(exact, '+')] / max(n, 1):.3f} of them")
    if write:
        Path(write, "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"written: {write}/meta.json")


def _file_solution(record: dict, tok, size: int, length: int):
    head = record["conversations"][1]["value"]
    question = head.split("### Question:\n", 1)[1].split("\n\n### Solution Process:\n", 1)[0]
    labels = [int(t["value"] == "+") for t in record["conversations"][2::2]]
    ids, slots = encode_for_scoring(tok, question, _steps_of(record), [1], length)
    tiles = img.image_to_tiles(img.load_image(record["image"]), image_size=size, max_num=1)
    return ids, slots, labels, tiles, all(labels)


def synthetic(model_dir: str, steps: int, lr: float, batch: int, grow: int, step_lm: float, seed: int,
              data: list[str] | None = None, save: str | None = None) -> None:
    rng = random.Random(seed)
    records = []  # --data: train on these PRM records instead (image paths relative to their file's folder)
    for f in data or []:
        for line in Path(f).read_text().splitlines():
            record = json.loads(line)
            record["image"] = str(Path(f).parent / record["image"])  # an absolute path stays as it is
            records.append(record)
    rng.shuffle(records)
    torch.manual_seed(seed)
    model = grow_llm_depth(load_model(model_dir, dtype=torch.float32), grow, seed=seed)
    tok = load_tokenizer(model_dir)
    good, bad = label_token_ids(tok)
    size, length = model.config.vision.image_size, model.config.image_seq_length

    def solution(data_seed: int, i: int, wrong: bool):
        ex = example("arithmetic", data_seed, i, size)
        ref = ex.answer.split("\n\n")
        digits = [int(x) for x in re.findall(r"\d+", ref[0])]
        error = rng.randrange(1, len(digits)) if wrong else None
        texts, labels, total, right = [ref[0]], [1], digits[0], True
        for k, d in enumerate(digits[1:], start=1):
            s = total + d if k != error else max(0, total + d + rng.choice([-3, -2, -1, 1, 2, 3]))
            right = right and k != error
            texts.append(f"{total} + {d} = {s}")
            labels.append(int(right))
            total = s
        texts.append(f"Final answer: {total}")
        labels.append(int(right))
        ids, slots = encode_for_scoring(tok, ex.question, texts, [1], length)
        return ids, slots, labels, _tiles(ex, size), not wrong

    def forward(items):
        ids, mask = pad_batch([it[0] for it in items], tok.pad_token_id or 0, side="left")
        logits = model(ids, torch.cat([it[3] for it in items]), attention_mask=mask).logits
        width = ids.shape[1]
        pairs, targets, lm = [], [], []
        for r, (row, slots, labs, _, right) in enumerate(items):
            at = torch.tensor(slots) + (width - len(row))
            pairs.append(logits[r, at][:, [good, bad]])
            targets += [1 - y for y in labs]
            if right and step_lm:  # the text after the image of a right solution
                start = width - len(row) + max(k for k, t in enumerate(row) if t == model.config.image_token_id) + 1
                lm.append(F.cross_entropy(logits[r, start:-1], ids[r, start + 1 :]))
        pairs = torch.cat(pairs)
        loss = F.cross_entropy(pairs, torch.tensor(targets))
        if lm:
            loss = loss + step_lm * torch.stack(lm).mean()
        return loss, pairs, torch.tensor(targets)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    used = 0
    for step in range(steps):
        model.train()
        if records:
            items = [_file_solution(records[(used + j) % len(records)], tok, size, length) for j in range(batch)]
        else:
            items = [solution(21000, used + j, rng.random() < 0.5) for j in range(batch)]
        loss, _, _ = forward(items)
        used += batch
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    model.eval()
    if save:
        save_model(model, save, tokenizer=tok)
        print(f"saved {save}: score the policy's samples with `nativevl eval ... --best-of-n 8 --prm {save}`")
    wins, n = 0.0, 150
    with torch.no_grad():
        for i in range(n):
            right, wrong = solution(40000, i, False), solution(40000, i, True)
            _, pairs, _ = forward([right, wrong])
            p = pairs.softmax(-1)[:, 0]
            a, b = p[: len(right[1])].mean(), p[len(right[1]) :].mean()
            wins += float(a > b) + 0.5 * float(a == b)
    print(f"held-out: the right solution scores above the wrong one for {wins / n:.3f} of {n} questions (chance 0.5)")


def rank(model_dir: str, prm_dirs: list[str], n: int) -> None:
    from nativevl.data.processor import chat_inputs
    from nativevl.eval.tasks import get_task
    from nativevl.infer.best_of_n import Candidates, sample_candidates
    from nativevl.infer.engine import Engine

    policy = load_model(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir)
    task = get_task("arithmetic")
    items = task.load(n, 40000)
    asked = [task.prompt(it) for it in items]
    cfg = policy.config
    prompts = [chat_inputs(tok, *q, image_size=cfg.vision.image_size, image_seq_length=cfg.image_seq_length,
                           system_message=None) for q in asked]
    engine = Engine(policy, tok, max_batch_size=64, max_seq_len=max(len(p[0]) for p in prompts) + task.max_new_tokens + 1,
                    max_queue=n + 1)
    sampled = sample_candidates(engine, [p[0] for p in prompts], [p[1] for p in prompts], n=8, temperature=0.7,
                                top_k=0, max_tokens=task.max_new_tokens, seed=40000)  # as `nativevl eval --seed 40000`
    for prm_dir in prm_dirs:
        prm = load_model(prm_dir, dtype=torch.float32).eval()
        wins, pairs = 0.0, 0
        best = {"mean": 0, "min": 0, "last": 0}
        for it, (msgs, _), texts, (_, tiles) in zip(items, asked, sampled, prompts, strict=True):
            ok = [task.score(t, it) for t in texts]
            steps = step_scores(prm, tok, msgs[0]["content"], texts, tiles, [1] * int(tiles.shape[0]))
            cands = Candidates(texts, step_scores=steps)  # the eval's picks: mean ('prm') and last step ('outcome')
            best["mean"] += ok[cands.pick("prm")]
            best["last"] += ok[cands.pick("outcome")]
            lowest = [min(x) for x in steps]
            best["min"] += ok[lowest.index(max(lowest))]
            means = [sum(x) / len(x) for x in steps]
            for a, right in zip(means, ok, strict=True):
                for b, other in zip(means, ok, strict=True):
                    if right and not other:
                        wins, pairs = wins + float(a > b) + 0.5 * float(a == b), pairs + 1
        print(f"{prm_dir}: a right sample above a wrong one of its question in {wins / max(pairs, 1):.3f} of {pairs} "
              f"pairs; Best-of-8 by mean {best['mean'] / n:.3f}, min {best['min'] / n:.3f}, last step "
              f"{best['last'] / n:.3f} ({n} questions)")


def _training_args(parser: argparse.ArgumentParser, *, steps: int, batch: int) -> argparse.ArgumentParser:
    """The options of the two subcommands that train a model: model folder, steps, lr, batch, seed."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("probe")
    a.add_argument("--prm", required=True)
    a.add_argument("--n", type=int, default=50)
    _training_args(sub.add_parser("isolated"), steps=500, batch=64)
    c = sub.add_parser("sums")
    c.add_argument("--model", required=True)
    c.add_argument("--n", type=int, default=60)
    r = sub.add_parser("rank")
    r.add_argument("--model", required=True)
    r.add_argument("--prm", nargs="+", required=True)
    r.add_argument("--n", type=int, default=120)
    d = sub.add_parser("labels")
    d.add_argument("folders", nargs="+", help="FOLDER:SEED of `nativevl data prm --toyworld arithmetic` outputs")
    d.add_argument("--write", default=None)
    e = _training_args(sub.add_parser("synthetic"), steps=1500, batch=16)
    e.add_argument("--grow", type=int, default=0)
    e.add_argument("--step_lm", type=float, default=0.0)
    e.add_argument("--data", nargs="*", default=None, help="PRM jsonl files to train on instead (e.g. labels --write)")
    e.add_argument("--save", default=None, help="write the trained PRM here")
    args = p.parse_args()
    if args.cmd == "probe":
        probe(args.prm, args.n)
    elif args.cmd == "isolated":
        isolated(args.model, args.steps, args.lr, args.batch, args.seed)
    elif args.cmd == "sums":
        sums(args.model, args.n)
    elif args.cmd == "rank":
        rank(args.model, args.prm, args.n)
    elif args.cmd == "labels":
        labels(args.folders, args.write)
    else:
        synthetic(args.model, args.steps, args.lr, args.batch, args.grow, args.step_lm, args.seed, args.data, args.save)


if __name__ == "__main__":
    main()
