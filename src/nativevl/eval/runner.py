"""One evaluation loop for every task: batched greedy generation, sharded by rank, verified scores,
per-task accuracy with its number of questions, chance level and a 95% (Wilson) interval."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from nativevl.data.images import pixel_digest, tiles_per_image
from nativevl.data.processor import chat_ids, image_tiles
from nativevl.eval.tasks import FILE_SUFFIXES, get_task
from nativevl.eval.tasks.base import EvalTask
from nativevl.eval.tasks.files import DEFAULT_FRAMES
from nativevl.infer.generate import generate_texts

log = logging.getLogger(__name__)

QUESTIONS_AT_ONCE = 64  # Best-of-N: questions tiled and given to one engine at a time


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_test(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test of two methods scored on the same questions: only the questions where they
    disagree count; under "equally good" each such question favours either side with probability 1/2.
    Two-sided p-value; `difference` = accuracy(b) - accuracy(a)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired test needs the same questions on both sides, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    d = a_only + b_only
    tail = sum(math.comb(d, i) for i in range(min(a_only, b_only) + 1)) / 2**d if d else 1.0
    return {"n": len(a), "a_only": a_only, "b_only": b_only, "difference": (b_only - a_only) / len(a),
            "p_value": min(1.0, 2 * tail)}


def records_of(report: dict, task: str, method: str | None = None) -> list[dict]:
    """A report's per-question records for `task` (evaluate: `correct`; Best-of-N: one key per method)."""
    if task not in report:
        raise ValueError(f"the report has no task {task!r} (it has {sorted(report)})")
    records = report[task].get("records")
    if records is None:
        raise ValueError(f"the report's {task!r} entry has no per-question records (written before they were kept)")
    key = method or "correct"
    if records and key not in records[0]:
        raise ValueError(f"{task!r} records have no {key!r} (they have {sorted(records[0])})")
    return records


def question_key(item) -> str:
    """A short fingerprint of a question (its text and answer), kept in every record."""
    return hashlib.sha1(f"{item.question}\x00{item.answer}".encode()).hexdigest()[:12]


def compare(a: dict, b: dict, task: str, method_a: str | None = None, method_b: str | None = None) -> dict:
    """Paired test of report a's method against report b's (the same report may be both) on `task`:
    the questions must be the same ones, in the same order (checked on their fingerprints, and on the
    reports' n and seed), asked with the same system message."""
    ra, rb = records_of(a, task, method_a), records_of(b, task, method_b)
    sa, sb = a[task].get("settings") or {}, b[task].get("settings") or {}
    if "system" in sa and "system" in sb and sa["system"] != sb["system"]:
        shown = [repr(x[:40] + "..." if isinstance(x, str) and len(x) > 40 else x)
                 for x in (sa["system"], sb["system"])]
        raise ValueError(f"the two reports asked {task!r} with different system messages ({shown[0]} and "
                         f"{shown[1]}); a training run's evaluations use its data's: `nativevl eval --system '...'` "
                         "asks the same way")
    same = all(sa.get(k) == sb.get(k) for k in ("n", "seed") if k in sa and k in sb)
    key = "question" if all("question" in r for r in ra + rb) else "answer"
    if not same or [r[key] for r in ra] != [r[key] for r in rb]:
        raise ValueError(f"the two reports asked different {task!r} questions (another seed or n?)")
    if any(not isinstance(r[m or "correct"], bool) for rs, m in ((ra, method_a), (rb, method_b)) for r in rs):
        raise ValueError(f"{task!r} is scored with partial credit ({a[task].get('metric') or b[task].get('metric')}): "
                         "the paired test compares right / wrong answers")
    return paired_test([bool(r[method_a or "correct"]) for r in ra], [bool(r[method_b or "correct"]) for r in rb])


def folder_identity(path: str | Path) -> str:
    """A checkpoint folder's (or one file's) path and a fingerprint of its files' names, sizes and
    modification times: a folder retrained or a file edited in place is another model or question set."""
    path = Path(path).resolve()
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    return f"{path} ({h.hexdigest()[:12]})"


def _task_settings(name: str, settings: dict, max_num: int | None, num_frames: int = DEFAULT_FRAMES) -> dict:
    """A task's settings in the report, with the n it was asked (a toy task's 200 when n is None, so a
    report made with `--n 200` resumes without it); an evaluation file's also hold the tiles per question
    and the file's identity (an edited file is another set of questions), and for a jsonl set the frames
    of its video questions when not the default 8 (so reports from before videos were asked still resume)."""
    path = Path(name)
    if path.suffix not in FILE_SUFFIXES:
        return {**settings, "n": settings["n"] if settings["n"] is not None else DEFAULT_N}
    from nativevl.eval.tasks.files import FileTask

    # how it is scored: a report scored another way (before circular scoring, say) is not reused
    task = FileTask(name, max_num, num_frames)
    # v2: InternVL's VLMEvalKit prompts; reader v2: a leading letter first, the article A, named option texts
    scoring = task.metric + ("/circular" if task.circular else "") + "; prompts v2; reader v2"
    tiles = max_num if max_num is not None else f"vlmevalkit ({task.vlmevalkit_max_num} per image)"
    # only a jsonl set can hold video questions: a benchmark TSV's report does not depend on the frames
    frames = {"num_frames": num_frames} if num_frames != DEFAULT_FRAMES and path.suffix == ".jsonl" else {}
    return {**settings, "max_num": tiles, **frames, "file": folder_identity(path) if path.is_file() else None,
            "scoring": scoring}


def _reusable(previous: dict | None, settings: dict, max_num: int | None = None,
              num_frames: int = DEFAULT_FRAMES) -> dict:
    """The tasks of an earlier report made with exactly these settings (model and tokenizer identity,
    n, seed, ...), for resuming; none when the model is unnamed (nothing says it is the same one)."""
    if not isinstance(previous, dict) or settings.get("model") is None:
        return {}
    return {name: old for name, old in previous.items()
            if isinstance(old, dict) and old.get("settings") == _task_settings(name, settings, max_num, num_frames)
            and "records" in old}


def _resumed(reusable: dict, tasks: list[str]) -> dict:
    """The report a resumed run starts from: the earlier tasks of the same settings that this run does
    not ask for, kept as they were (a task it asks for is reused or run again in its turn)."""
    return {name: entry for name, entry in reusable.items() if name not in tasks}


def _resolve(tasks: list[str], max_num: int | None, num_frames: int = DEFAULT_FRAMES) -> list:
    """Every task, checked before any runs (an unknown name used to stop the run after the tasks before
    it had been generated for; an empty list wrote an empty report)."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    return [get_task(name, max_num, num_frames) for name in tasks]


DEFAULT_N = EvalTask.default_n  # questions per toy task when n is None


def _count(task, n: int | None) -> int | None:
    """Questions to ask of a task: n, or without one 200 of a toy task and all of a file's."""
    return n if n is not None else task.default_n


class LazyPrompts(Sequence):
    """`task.prompt(item)` of each item when it is asked for, so that a file task's images are decoded
    batch by batch rather than all before the first batch."""

    def __init__(self, task, items: list) -> None:
        self.task, self.items = task, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.task.prompt(it) for it in self.items[i]]
        return self.task.prompt(self.items[i])


def _tiles(max_num, n_images: int) -> int:
    """Tiles per image: a task's tile_cap(n_images), or max_num tiles shared by the images."""
    return max_num(n_images) if callable(max_num) else tiles_per_image(max_num, n_images)


def _prompt_row(tokenizer, cfg, prompt: tuple[list[dict], list], max_num, system_message: str | None,
                tiled: dict) -> tuple[list[int], list[torch.Tensor], list[str] | None]:
    """(ids, each image's tiles, each image's vision cache key, or None) of one prompt; `tiled` holds the
    tiles of the pictures seen so far by pixels and tile cap (a picture asked about again, a rotated
    question's, is tiled once and its tiles are the same tensor: generate_texts encodes it once)."""
    messages, images = prompt
    cap = _tiles(max_num, len(images))
    tiles, keys = [], []
    for im in images:
        digest = pixel_digest(im)
        if digest is None:  # not read here (a path): tiled for this prompt, and the prompt's images not cached
            tiles += image_tiles([im], image_size=cfg.vision.image_size, max_num=cap)
            keys = None
            continue
        if (digest, cap) not in tiled:
            tiled[digest, cap] = image_tiles([im], image_size=cfg.vision.image_size, max_num=cap)
        tiles += tiled[digest, cap]
        if keys is not None:
            keys += [f"{digest}/{cap}/{j}" for j in range(len(tiled[digest, cap]))]  # a clip: one per frame
    ids = chat_ids(tokenizer, messages, [t.shape[0] for t in tiles], image_seq_length=cfg.image_seq_length,
                   system_message=system_message)
    return ids, tiles, keys


@torch.no_grad()
def predict_engine(model, tokenizer, prompts: Sequence[tuple[list[dict], list]], *, max_new_tokens: int,
                   batch_size: int, system_message: str | None, desc: str = "", max_num=1, heartbeat=None,
                   progress: bool = True, reuse: dict | None = None) -> list[str]:
    """`predict`'s greedy answers through the inference engine (`nativevl eval --engine`): up to
    `batch_size` rows decode together and a finished row's slot goes to the next prompt at once
    (continuous batching; on a GPU the decode step replays as a CUDA graph). A picture asked about again
    is taken from the engine's vision cache while it is there, in the same batch or a later one. Decoding
    stops at the model's end tokens only and never emits the image placeholder, as `predict`'s. The
    engine's KV cache is sized to the longest prompt so far (doubled when a longer one comes, after the
    running rows finish); a prompt past the model's positions with dynamic RoPE (which the engine's static
    step does not rescale) is answered by plain generate. One process's own model: not for collective
    (FSDP) forwards. `heartbeat()` is called after every `batch_size` answers. `reuse`: a dict whose
    "engine" is taken up and left for the next call (an evaluation's tasks share one engine: its compiled
    step, graphs and vision cache)."""
    from nativevl.infer.engine import Engine, SamplingParams

    cfg = model.config
    eos = cfg.text.eos_token_id
    params = SamplingParams(max_tokens=max_new_tokens, ignore_eos=True,
                            stop_token_ids=tuple(eos) if isinstance(eos, list | tuple) else (eos,))
    answers: list[str] = [""] * len(prompts)
    running: dict = {}  # prompt index -> its request
    reuse = {} if reuse is None else reuse
    engine, row, ahead, done = reuse.pop("engine", None), None, 0, 0
    if engine is not None and (engine.model is not model or engine.max_batch_size != batch_size):
        engine = None
    tiled: OrderedDict = OrderedDict()  # the latest pictures' tiles (a question's rotations follow each other)
    dynamic = cfg.text.rope_type == "dynamic"
    bar = tqdm(total=len(prompts), desc=desc, unit="question", leave=False, disable=not progress)
    while ahead < len(prompts) or running:
        while ahead < len(prompts) and len(running) < batch_size:
            if row is None:
                row = _prompt_row(tokenizer, cfg, prompts[ahead], max_num, system_message, tiled)
                while len(tiled) > 8:
                    tiled.popitem(last=False)
            ids, tiles, keys = row
            need = len(ids) + max_new_tokens + 1
            if dynamic and need > cfg.text.max_position_embeddings:  # rescaled RoPE: plain generate's
                answers[ahead] = generate_texts(model, tokenizer, [(ids, tiles)], batch_size=1,
                                                max_new_tokens=max_new_tokens, progress=False)[0]
                ahead, row, done = ahead + 1, None, done + 1
                bar.update(1)
                continue
            if engine is None or need > engine.max_seq_len:
                if running:  # a longer prompt: the running rows finish in the engine they started in
                    break
                size = max(need, 2 * engine.max_seq_len) if engine is not None else need
                if need <= cfg.text.max_position_embeddings:
                    size = min(size, cfg.text.max_position_embeddings)
                engine = None  # the old KV cache goes before the new one is made (the engine's decoder
                gc.collect()  # holds a reference cycle: its decode body is its own bound method)
                engine = Engine(model, tokenizer, max_batch_size=batch_size, max_seq_len=size, max_queue=batch_size,
                                suppress_token_ids=(cfg.image_token_id,))
            running[ahead] = engine.submit(ids, params, torch.cat(tiles) if tiles else None, image_keys=keys or None,
                                           tiles_per_image=[t.shape[0] for t in tiles] if keys else None)
            ahead, row = ahead + 1, None
        if running:
            engine.step()
        for i in [i for i, req in running.items() if req.done]:
            answers[i] = running.pop(i).result()[0].text
            done += 1
            bar.update(1)
            if heartbeat is not None and done % batch_size == 0:
                heartbeat()
    bar.close()
    if engine is not None:
        reuse["engine"] = engine
    return answers


@torch.no_grad()
def predict(model, tokenizer, prompts: Sequence[tuple[list[dict], list]], *, max_new_tokens: int, batch_size: int,
            system_message: str | None, desc: str = "", max_num=1, synced: bool = False, filler=None,
            heartbeat=None, progress: bool = True) -> list[str]:
    """Greedy answers for (messages, images) prompts, `batch_size` at a time (left padding); up to
    `max_num` tiles per prompt, shared by its images (or `max_num(n_images)` tiles per image, a task's
    `tile_cap`); tiled batch by batch (4,000 questions at 7 tiles would be ~67 GB at once). A picture
    that several prompts of a batch show (the same pixels) is tiled once and runs through the ViT once.

    `synced`: every process calls this together with its own prompts and a model whose forwards are
    collective (FSDP): each runs as many batches as the process with the most, the missing ones on the
    prompt `filler()` gives, whose answers are dropped. `heartbeat()` is called after every batch."""
    cfg = model.config
    rounds = -(-len(prompts) // batch_size)
    if synced and torch.distributed.is_initialized():
        most = torch.tensor([float(rounds)], device=model.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        rounds = int(most.item())
    answers: list[str] = []
    for r in tqdm(range(rounds), desc=desc, unit="batch", leave=False, disable=not progress):
        chunk = prompts[r * batch_size : (r + 1) * batch_size]
        asked = chunk or [filler()]  # nothing left here: a stand-in that keeps this process in step
        tiled: dict = {}  # the batch's pictures, by pixels and tile cap
        rows = [_prompt_row(tokenizer, cfg, prompt, max_num, system_message, tiled)[:2] for prompt in asked]
        texts = generate_texts(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               progress=False, synced=synced)
        answers += texts[: len(chunk)]
        if heartbeat is not None:
            heartbeat()
    return answers


def evaluate(model, tokenizer, tasks: list[str], *, n: int | None = 100, seed: int = 10_000, batch_size: int = 16,
             system_message: str | None = None, rank: int = 0, world_size: int = 1, predictor=None,
             model_name: str | None = None, previous: dict | None = None, on_task=None,
             max_num: int | None = None, synced: bool = False, heartbeat=None,
             num_frames: int = DEFAULT_FRAMES, engine: bool = False) -> dict:
    """{task: {accuracy, n, correct, chance, ci95, examples, records, settings}}; every rank scores items
    i % world == rank (of a circular file, questions: each with all its rotations). `synced`: the model's
    forwards are collective (FSDP, in training): the ranks generate in step (`predict`); `heartbeat()` is
    called after every batch. `engine`: decode with the inference engine (`predict_engine`: continuous
    batching, CUDA graphs on a GPU, the vision cache) instead of plain batched generation; not with `synced`.

    `predictor(task, items) -> answers` replaces the model (the tests check the scoring with it).
    Resuming: the tasks of `previous` (an earlier report) made with the same settings (`model_name`, an
    identity of the model and tokenizer that the caller makes, n, seed, system message) are taken as
    they are, those this run does not ask for included; `on_task(report)` is called after every task
    (the CLI writes the report there, so an interrupted run keeps its finished tasks). Tasks are toy-world
    families or evaluation files (`eval/tasks/files.py`), tiled as `FileTask.tile_cap` says (`max_num`
    tiles per question shared by its images, or with None as InternVL's VLMEvalKit model tiles the file);
    a file's video questions are asked with `num_frames` frames.
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1 question per task, got {n}")
    if engine and synced:
        raise ValueError("the inference engine runs one process's own model; a sharded (synced) evaluation "
                         "generates with plain batches")
    resolved = _resolve(tasks, max_num, num_frames)
    if model is not None:
        model.eval()
    settings = {"model": model_name, "n": n, "seed": seed, "system": system_message}
    reusable = _reusable(previous, settings, max_num, num_frames)
    report = _resumed(reusable, tasks)
    engines: dict = {}  # with `engine`: the one the tasks share
    for name, task in zip(tasks, resolved):
        if name in reusable:
            log.info("task %s: reusing its result from the earlier report (same model and settings)", name)
            report[name] = reusable[name]
            continue
        items = task.load(_count(task, n), seed)
        # whole questions to each rank, their rows together: a circular file's rotations of a question (the
        # same picture) share a batch and one ViT run
        order = ([i for group in task.groups(items)[rank::world_size] for i in group] if task.circular
                 else list(range(rank, len(items), world_size)))
        mine = [items[i] for i in order]
        if predictor is not None:
            predictions = predictor(task, mine)
        elif engine:
            predictions = predict_engine(model, tokenizer, LazyPrompts(task, mine), max_new_tokens=task.max_new_tokens,
                                         batch_size=batch_size, system_message=system_message, desc=name,
                                         max_num=task.tile_cap, heartbeat=heartbeat, progress=rank == 0,
                                         reuse=engines)
        else:
            predictions = predict(model, tokenizer, LazyPrompts(task, mine), max_new_tokens=task.max_new_tokens,
                                  batch_size=batch_size, system_message=system_message, desc=name,
                                  max_num=task.tile_cap, synced=synced,
                                  filler=lambda task=task, first=items[0]: task.prompt(first), heartbeat=heartbeat,
                                  progress=rank == 0)
        binary = task.binary
        # right / wrong, or partial credit in [0, 1] (ANLS, VQA accuracy): the mean is the task's score
        correct = [bool(c) if binary else float(c) for c in (task.score(p, it) for p, it in zip(predictions, mine))]
        k = sum(correct)
        records = [{"index": i, "question": question_key(it), "answer": it.answer, "prediction": p, "correct": c}
                   for i, it, p, c in zip(order, mine, predictions, correct)]
        if world_size > 1:
            gathered: list = [None] * world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
            # NCCL (the process group on GPUs) reduces CUDA tensors only
            on_gpu = torch.distributed.get_backend() == "nccl"
            totals = torch.tensor([k, len(mine)], dtype=torch.float64,
                                  device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
            torch.distributed.all_reduce(totals)
            k = round(totals[0].item()) if binary else totals[0].item()
        records.sort(key=lambda r: r["index"])
        n_scored = len(items)
        if task.circular:  # one record per question: right only if every rotation is
            records = task.group_records(records, items)
            k, n_scored = sum(r["correct"] for r in records), len(records)
        low, high = wilson(k, n_scored)
        report[name] = {
            "accuracy": k / n_scored,
            "n": n_scored,
            "correct": k,
            "chance": task.chance(items, seed),
            "ci95": [low, high],
            "examples": [{"question": it.question[-80:], "answer": it.answer, "prediction": p, "correct": c}
                         for it, p, c in list(zip(mine, predictions, correct))[:3]],
            "records": records,  # every question: for paired tests between models (`nativevl compare`)
            "settings": _task_settings(name, settings, max_num, num_frames),
        }
        if not binary:  # the "accuracy" is the mean of this metric (its interval: Wilson's, as an approximation)
            report[name]["metric"] = task.metric
        if task.circular:
            report[name].update(metric="circular", rows=len(items),
                                row_accuracy=sum(r["correct"] for g in records for r in g["rows"]) / len(items))
        if on_task is not None:
            on_task(report)
    return report


def _scored(k: int, n: int) -> dict:
    low, high = wilson(k, n)
    return {"accuracy": k / n, "correct": k, "n": n, "ci95": [low, high]}


def evaluate_best_of_n(model, tokenizer, tasks: list[str], *, n: int | None = 100, seed: int = 10_000, samples: int = 8,
                       prm=None, temperature: float = 0.7, top_k: int = 0, system_message: str | None = None,
                       max_batch_size: int = 64, model_name: str | None = None, prm_name: str | None = None,
                       previous: dict | None = None, on_task=None, prm_max_steps: int = 12,
                       max_num: int | None = None, num_frames: int = DEFAULT_FRAMES) -> dict:
    """Test-time scaling on each task: greedy pass@1, the mean accuracy of single samples, majority
    vote of `samples`, and (with a PRM) Best-of-N by PRM score and by outcome score. Every question's
    samples come from one prefill (the engine clones it) with seed (seed + question index).
    `previous` / `on_task` resume as in `evaluate` (settings: model and PRM names, n, seed, sampling).
    `prm_max_steps`: the PRM splits a solution into at most this many steps, as its data did
    (`nativevl data prm --max_steps`)."""
    if (n is not None and n < 1) or samples < 1:
        raise ValueError(f"n must be >= 1 question per task and samples >= 1, got n={n}, samples={samples}")
    resolved = _resolve(tasks, max_num, num_frames)
    partial = [name for name, t in zip(tasks, resolved) if not t.binary]
    if partial:
        raise ValueError(f"Best-of-N picks right / wrong answers; {partial} are scored with partial credit "
                         "(ANLS, VQA accuracy): evaluate them without --best-of-n")
    from nativevl.infer.best_of_n import Candidates, sample_candidates, tiles_in_prompt
    from nativevl.infer.engine import Engine, SamplingParams
    from nativevl.infer.prm import step_scores

    model.eval()
    cfg = model.config
    settings = {"model": model_name, "prm": prm_name, "n": n, "seed": seed, "samples": samples,
                "temperature": temperature, "top_k": top_k, "system": system_message, "prm_max_steps": prm_max_steps}
    reusable = _reusable(previous, settings, max_num, num_frames)
    report = _resumed(reusable, tasks)
    for name, task in zip(tasks, resolved):
        if name in reusable:
            log.info("task %s: reusing its result from the earlier report (same model and settings)", name)
            report[name] = reusable[name]
            continue
        items = task.load(_count(task, n), seed)
        counts = {"pass1": 0, "sample_mean": 0.0, f"majority{samples}": 0}
        if prm is not None:
            counts.update({f"prm_best{samples}": 0, f"outcome_best{samples}": 0, f"oracle{samples}": 0})
        # a circular file's rows question by question (a picture's rotations in one chunk); others in order
        order = [i for group in task.groups(items) for i in group] if task.circular else list(range(len(items)))
        records, prefills, engine = [], 0, None
        bar = tqdm(total=len(items), desc=f"{name} best-of-{samples}", leave=False)
        # questions go QUESTIONS_AT_ONCE at a time: their tiles (up to 7 per image at 448 px: 17 MB) and
        # an engine sized for their longest prompt; the question asked j-th samples with seed + j whatever
        # its chunk. Its pictures, keyed by pixels, run through the ViT once: the samples take them from
        # the engine's vision cache
        for c0 in range(0, len(order), QUESTIONS_AT_ONCE):
            chunk = [items[i] for i in order[c0 : c0 + QUESTIONS_AT_ONCE]]
            asked = [task.prompt(it) for it in chunk]
            tiled: dict = {}
            rows = [_prompt_row(tokenizer, cfg, prompt, task.tile_cap, system_message, tiled) for prompt in asked]
            longest = max(len(ids) for ids, _, _ in rows) + task.max_new_tokens + 1
            if engine is None or longest > engine.max_seq_len:  # one engine while the prompts fit its cache
                engine = None
                gc.collect()  # the old engine's KV cache goes first (it holds a reference cycle)
                # the image placeholder is never generated, as in `evaluate` and the data pipelines
                engine = Engine(model, tokenizer, max_batch_size=max(max_batch_size, samples),
                                max_seq_len=longest, max_queue=QUESTIONS_AT_ONCE + 1,
                                suppress_token_ids=(cfg.image_token_id,))
            before = engine.stats["prefills"]
            ids, pixels = [r[0] for r in rows], [torch.cat(r[1]) if r[1] else None for r in rows]
            keys = [r[2] or None for r in rows]  # none for a prompt without images (or with one not keyed)
            counts_per_image = [[t.shape[0] for t in r[1]] if r[2] else None for r in rows]
            greedy = engine.generate(ids, SamplingParams(max_tokens=task.max_new_tokens), pixels, keys,
                                     counts_per_image)
            sampled = sample_candidates(engine, ids, pixels, n=samples, temperature=temperature, top_k=top_k,
                                        max_tokens=task.max_new_tokens, seed=seed + c0, image_keys=keys,
                                        tiles_per_image=counts_per_image)
            prefills += engine.stats["prefills"] - before
            for i, it, (msgs, _), g, texts, prompt_ids, tiles in zip(
                    order[c0 : c0 + QUESTIONS_AT_ONCE], chunk, asked, greedy, sampled, ids, pixels, strict=True):
                ok = [bool(task.score(t, it)) for t in texts]
                # a file task votes by its reading of an answer (the option letter); the toy tasks by final answer
                cands = Candidates(texts, vote_key=(lambda t, it=it, task=task: task.vote_key(t, it))
                                   if task.vote_key is not None else None)
                record = {"index": i, "question": question_key(it), "answer": it.answer,
                          "pass1": bool(task.score(g[0].text, it)),
                          "samples_correct": sum(ok), f"majority{samples}": ok[cands.pick("majority")]}
                if prm is not None:
                    per_image = tiles_in_prompt(prompt_ids, cfg.image_token_id, cfg.image_seq_length)
                    cands.step_scores = step_scores(prm, tokenizer, msgs[0]["content"], texts, tiles, per_image,
                                                    max_steps=prm_max_steps)
                    record.update({f"prm_best{samples}": ok[cands.pick("prm")],
                                   f"outcome_best{samples}": ok[cands.pick("outcome")], f"oracle{samples}": any(ok)})
                records.append(record)
                counts["sample_mean"] += sum(ok) / len(ok)
                for key in counts:
                    if key != "sample_mean":
                        counts[key] += record[key]
                bar.update(1)
        bar.close()
        total = len(items)
        if task.circular:  # one record per question: a method's pick right only if it is on every rotation
            records.sort(key=lambda r: r["index"])
            methods = tuple(key for key in counts if key != "sample_mean")
            grouped = task.group_records(records, items, keys=methods)
            for g in grouped:  # a single sample right on every rotation (rotations sampled independently)
                g["sample_accuracy"] = math.prod(r["samples_correct"] / samples for r in g["rows"])
            counts = {key: sum(g[key] for g in grouped) for key in methods}
            counts["sample_mean"] = sum(g["sample_accuracy"] for g in grouped)
            records, total = grouped, len(grouped)
        entry = {key: _scored(round(v) if key != "sample_mean" else 0, total) for key, v in counts.items()}
        entry["sample_mean"] = {"accuracy": counts["sample_mean"] / total, "n": total}
        if task.circular:
            entry.update(metric="circular", rows=len(items))
        entry.update({"samples": samples, "temperature": temperature, "top_k": top_k, "seed": seed,
                      "chance": task.chance(items, seed), "prefills": prefills})
        entry["paired"] = {  # the PRM's pick against greedy and against the vote, on the same questions
            f"{b} vs {a}": paired_test([r[a] for r in records], [r[b] for r in records])
            for a, b in (("pass1", f"prm_best{samples}"), (f"majority{samples}", f"prm_best{samples}"),
                         ("pass1", f"majority{samples}"))
            if b in records[0] and a in records[0]
        }
        entry["records"] = records
        entry["settings"] = _task_settings(name, settings, max_num, num_frames)
        report[name] = entry
        if on_task is not None:
            on_task(report)
    return report


def best_of_n_table(report: dict, title: str = "") -> str:
    lines = [f"### {title}" if title else "", "", "| task | method | accuracy | 95% interval | n |", "|---|---|---|---|---|"]
    for name, r in report.items():
        for key, v in r.items():
            if isinstance(v, dict) and "ci95" in v:
                lines.append(f"| {name} | {key} | {v['accuracy']:.3f} | {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f} | {v['n']} |")
            elif isinstance(v, dict) and "accuracy" in v:
                lines.append(f"| {name} | {key} | {v['accuracy']:.3f} | | {v['n']} |")
    paired = [(name, key, t) for name, r in report.items() for key, t in r.get("paired", {}).items()]
    if paired:
        lines += ["", "Paired on the same questions (exact McNemar test):", "",
                  "| task | comparison | difference | only the first right | only the second right | p |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {key} | {t['difference']:+.3f} | {t['b_only']} | {t['a_only']} | {t['p_value']:.3g} |"
                  for name, key, t in paired]
    return "\n".join(lines).strip() + "\n"


def markdown_table(report: dict, title: str = "") -> str:
    lines = [f"### {title}" if title else "", "", "| task | accuracy | 95% interval | chance | n |", "|---|---|---|---|---|"]
    for name, r in report.items():
        label = f"{name} ({r['metric']})" if r.get("metric") else name
        lines.append(f"| {label} | {r['accuracy']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {r['chance']:.3f} | {r['n']} |")
    return "\n".join(lines).strip() + "\n"


def write_report(report: dict, out: str | Path, table: str | None = None) -> None:
    """out (.json) and the markdown table beside it (default: the accuracy table)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table if table is not None else markdown_table(report, "evaluation"))
