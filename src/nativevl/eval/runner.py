"""One evaluation loop for every task: batched greedy generation, sharded by rank, verified scores,
per-task accuracy with its number of questions, chance level and a 95% (Wilson) interval."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from nativevl.data.processor import chat_inputs, pad_batch
from nativevl.eval.tasks import get_task
from nativevl.infer.generate import generate


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def chance_level(task, seed: int, n: int = 2000) -> float:
    """Accuracy of always giving the most frequent answer of each question kind, measured on `n`
    generated questions (more than an evaluation holds, so that the estimate is not inflated)."""
    items = task.load(n, seed)
    by_kind = defaultdict(Counter)
    for item in items:
        by_kind[item.kind][task.answer_key(item)] += 1
    return sum(c.most_common(1)[0][1] for c in by_kind.values()) / max(1, len(items))


@torch.no_grad()
def predict(model, tokenizer, prompts: list[tuple[list[dict], list]], *, max_new_tokens: int, batch_size: int,
            system_message: str | None, desc: str = "") -> list[str]:
    """Greedy answers for (messages, images) prompts, `batch_size` at a time (left padding)."""
    cfg = model.config
    device = model.device
    answers: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        chunk = prompts[start : start + batch_size]
        ids, pixels = [], []
        for messages, images in chunk:
            prompt_ids, tiles = chat_inputs(tokenizer, messages, images, image_size=cfg.vision.image_size,
                                            image_seq_length=cfg.image_seq_length, system_message=system_message)
            ids.append(prompt_ids)
            pixels += [] if tiles is None else [tiles]
        input_ids, mask = pad_batch(ids, tokenizer.pad_token_id or 0, side="left")
        width = input_ids.shape[1]
        out = generate(model, input_ids.to(device), torch.cat(pixels).to(device) if pixels else None,
                       attention_mask=mask.to(device), max_new_tokens=max_new_tokens)
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return answers


def evaluate(model, tokenizer, tasks: list[str], *, n: int = 100, seed: int = 10_000, batch_size: int = 16,
             system_message: str | None = None, rank: int = 0, world_size: int = 1, predictor=None) -> dict:
    """{task: {accuracy, n, correct, chance, ci95, examples}}; every rank scores items i % world == rank.

    `predictor(task, items) -> answers` replaces the model (the tests check the scoring with it).
    """
    if model is not None:
        model.eval()
    report = {}
    for name in tasks:
        task = get_task(name)
        items = task.load(n, seed)
        mine = items[rank::world_size]
        if predictor is not None:
            predictions = predictor(task, mine)
        else:
            predictions = predict(model, tokenizer, [task.prompt(it) for it in mine], max_new_tokens=task.max_new_tokens,
                                  batch_size=batch_size, system_message=system_message, desc=name)
        correct = [task.score(p, it) for p, it in zip(predictions, mine)]
        k = sum(correct)
        if world_size > 1:
            totals = torch.tensor([k, len(mine)], dtype=torch.long)
            torch.distributed.all_reduce(totals)
            k = int(totals[0])
        low, high = wilson(k, len(items))
        report[name] = {
            "accuracy": k / len(items),
            "n": len(items),
            "correct": k,
            "chance": chance_level(task, seed),
            "ci95": [low, high],
            "examples": [{"question": it.question[-80:], "answer": it.answer, "prediction": p, "correct": c}
                         for it, p, c in list(zip(mine, predictions, correct))[:3]],
        }
    return report


def markdown_table(report: dict, title: str = "") -> str:
    lines = [f"### {title}" if title else "", "", "| task | accuracy | 95% interval | chance | n |", "|---|---|---|---|---|"]
    for name, r in report.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {r['chance']:.3f} | {r['n']} |")
    return "\n".join(lines).strip() + "\n"


def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(report, "evaluation"))
