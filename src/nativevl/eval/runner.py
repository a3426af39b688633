"""One evaluation loop for every task: batched greedy generation, sharded by rank, verified scores,
per-task accuracy with its number of questions, chance level and a 95% (Wilson) interval."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from nativevl.data.processor import chat_inputs
from nativevl.eval.tasks import get_task
from nativevl.infer.generate import generate_texts


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _resolve(tasks: list[str]) -> list:
    """Every task, checked before any runs (an unknown name used to stop the run after the tasks before
    it had been generated for; an empty list wrote an empty report)."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    return [get_task(name) for name in tasks]


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
    rows = [chat_inputs(tokenizer, messages, images, image_size=cfg.vision.image_size,
                        image_seq_length=cfg.image_seq_length, system_message=system_message)
            for messages, images in prompts]
    return generate_texts(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens, desc=desc)


def evaluate(model, tokenizer, tasks: list[str], *, n: int = 100, seed: int = 10_000, batch_size: int = 16,
             system_message: str | None = None, rank: int = 0, world_size: int = 1, predictor=None) -> dict:
    """{task: {accuracy, n, correct, chance, ci95, examples}}; every rank scores items i % world == rank.

    `predictor(task, items) -> answers` replaces the model (the tests check the scoring with it).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 question per task, got {n}")
    resolved = _resolve(tasks)
    if model is not None:
        model.eval()
    report = {}
    for name, task in zip(tasks, resolved):
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
            # NCCL (the process group on GPUs) reduces CUDA tensors only
            on_gpu = torch.distributed.get_backend() == "nccl"
            totals = torch.tensor([k, len(mine)], dtype=torch.long,
                                  device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
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


def _scored(k: int, n: int) -> dict:
    low, high = wilson(k, n)
    return {"accuracy": k / n, "correct": k, "n": n, "ci95": [low, high]}


def evaluate_best_of_n(model, tokenizer, tasks: list[str], *, n: int = 100, seed: int = 10_000, samples: int = 8,
                       prm=None, temperature: float = 0.7, top_k: int = 0, system_message: str | None = None,
                       max_batch_size: int = 64) -> dict:
    """Test-time scaling on each task: greedy pass@1, the mean accuracy of single samples, majority
    vote of `samples`, and (with a PRM) Best-of-N by PRM score and by outcome score. Every question's
    samples come from one prefill (the engine clones it) with seed (seed + question index)."""
    if n < 1 or samples < 1:
        raise ValueError(f"n must be >= 1 question per task and samples >= 1, got n={n}, samples={samples}")
    resolved = _resolve(tasks)
    from nativevl.infer.best_of_n import Candidates, sample_candidates
    from nativevl.infer.engine import Engine, SamplingParams
    from nativevl.infer.prm import step_scores

    model.eval()
    cfg = model.config
    report = {}
    for name, task in zip(tasks, resolved):
        items = task.load(n, seed)
        asked = [task.prompt(it) for it in items]
        prompts = [chat_inputs(tokenizer, *q, image_size=cfg.vision.image_size,
                               image_seq_length=cfg.image_seq_length, system_message=system_message) for q in asked]
        longest = max(len(ids) for ids, _ in prompts) + task.max_new_tokens + 1
        engine = Engine(model, tokenizer, max_batch_size=max(max_batch_size, samples), max_seq_len=longest,
                        max_queue=len(items) + 1)
        ids, pixels = [p[0] for p in prompts], [p[1] for p in prompts]
        greedy = engine.generate(ids, SamplingParams(max_tokens=task.max_new_tokens), pixels)
        sampled = sample_candidates(engine, ids, pixels, n=samples, temperature=temperature, top_k=top_k,
                                    max_tokens=task.max_new_tokens, seed=seed)
        counts = {"pass1": 0, "sample_mean": 0.0, f"majority{samples}": 0}
        if prm is not None:
            counts.update({f"prm_best{samples}": 0, f"outcome_best{samples}": 0, f"oracle{samples}": 0})
        for it, (msgs, _), g, texts, (_, tiles) in tqdm(
            zip(items, asked, greedy, sampled, prompts, strict=True), total=len(items),
            desc=f"{name} best-of-{samples}", leave=False,
        ):
            ok = [task.score(t, it) for t in texts]
            counts["pass1"] += task.score(g[0].text, it)
            counts["sample_mean"] += sum(ok) / len(ok)
            cands = Candidates(texts)
            counts[f"majority{samples}"] += ok[cands.pick("majority")]
            if prm is not None:
                # chat_inputs tiles each image into one tile (max_num=1)
                per_image = [1] * (0 if tiles is None else int(tiles.shape[0]))
                cands.step_scores = step_scores(prm, tokenizer, msgs[0]["content"], texts, tiles, per_image)
                counts[f"prm_best{samples}"] += ok[cands.pick("prm")]
                counts[f"outcome_best{samples}"] += ok[cands.pick("outcome")]
                counts[f"oracle{samples}"] += any(ok)
        total = len(items)
        entry = {key: _scored(round(v) if key != "sample_mean" else 0, total) for key, v in counts.items()}
        entry["sample_mean"] = {"accuracy": counts["sample_mean"] / total, "n": total}
        entry.update({"samples": samples, "temperature": temperature, "top_k": top_k, "seed": seed,
                      "chance": chance_level(task, seed), "prefills": engine.stats["prefills"]})
        report[name] = entry
    return report


def best_of_n_table(report: dict, title: str = "") -> str:
    lines = [f"### {title}" if title else "", "", "| task | method | accuracy | 95% interval | n |", "|---|---|---|---|---|"]
    for name, r in report.items():
        for key, v in r.items():
            if isinstance(v, dict) and "ci95" in v:
                lines.append(f"| {name} | {key} | {v['accuracy']:.3f} | {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f} | {v['n']} |")
            elif isinstance(v, dict):
                lines.append(f"| {name} | {key} | {v['accuracy']:.3f} | | {v['n']} |")
    return "\n".join(lines).strip() + "\n"


def markdown_table(report: dict, title: str = "") -> str:
    lines = [f"### {title}" if title else "", "", "| task | accuracy | 95% interval | chance | n |", "|---|---|---|---|---|"]
    for name, r in report.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {r['chance']:.3f} | {r['n']} |")
    return "\n".join(lines).strip() + "\n"


def write_report(report: dict, out: str | Path, table: str | None = None) -> None:
    """out (.json) and the markdown table beside it (default: the accuracy table)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table if table is not None else markdown_table(report, "evaluation"))
