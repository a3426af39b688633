"""Evaluation inside training: `nativevl eval`'s tasks (toy-world families, benchmark and custom sets from
files) on the model being trained, every `eval_every` steps and at the end.

Each evaluation writes DIR/evals/step-NNNNNN.json (+ .md), the report `nativevl eval` writes, so two
steps (or a step and any other model's report with the same n and seed) compare question by question
with `nativevl compare`; its accuracies go to metrics.jsonl (`eval_<task>`) and tensorboard's eval/.
Evaluating changes nothing in the training run: dropout is off, the RNG is restored, the model goes back
to training mode. Several processes evaluate together: each generates for its share of the questions
with the sharded model, in step with the others (eval/runner.py `predict`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from nativevl.eval.runner import evaluate, markdown_table, write_report
from nativevl.eval.tasks import FILE_SUFFIXES, get_task
from nativevl.train import checkpoint as ckpt
from nativevl.train.parallel import broadcast_object, is_distributed

log = logging.getLogger(__name__)

EVAL_SEED = 10_000  # the questions `nativevl eval` asks by default: in-training reports compare with its reports


def task_names(spec: str) -> list[str]:
    """The comma-separated task list of --eval_tasks."""
    return [name.strip() for name in spec.split(",") if name.strip()]


def metric_key(task: str) -> str:
    """`eval_<task>` in metrics.jsonl: a toy family by name, a file by its name without the folder and suffix."""
    return "eval_" + (Path(task).stem if Path(task).suffix in FILE_SUFFIXES else task)


class TrainingEval:
    """The run's evaluation: its tasks checked (and a file's first questions read) when it is made, so a
    wrong name or a missing file stops the run before its first step rather than at its first evaluation."""

    def __init__(self, spec: str, *, every: int, n: int, batch_size: int, tokenizer, out_dir: str | Path,
                 rank: int, world: int, system_message: str | None = None) -> None:
        self.tasks = task_names(spec)
        if not self.tasks:
            raise ValueError(f"eval_tasks {spec!r} names no task")
        keys = [metric_key(t) for t in self.tasks]
        if len(set(keys)) < len(keys):
            raise ValueError(f"eval_tasks {spec!r} holds two tasks of the same name: {sorted(keys)}")
        for name in self.tasks:
            try:
                get_task(name).load(n, EVAL_SEED)
            except (OSError, ValueError) as e:
                raise ValueError(f"eval_tasks: {name}: {e}") from None
        self.every, self.n, self.batch_size = every, n, batch_size
        self.tokenizer, self.out_dir, self.rank, self.world = tokenizer, Path(out_dir), rank, world
        self.system_message = system_message  # the training data's: the model is asked as it is taught

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == max_steps

    def report_path(self, step: int) -> Path:
        return self.out_dir / "evals" / f"step-{step:06d}.json"

    def missing(self, step: int, max_steps: int) -> bool:
        """An evaluation due at `step` whose report is not there (the run stopped after that step's
        checkpoint, before its evaluation ended): a resume runs it first. Rank 0 looks; all agree."""
        return self.due(step, max_steps) and bool(broadcast_object(not self.report_path(step).is_file()))

    @torch.no_grad()
    def __call__(self, model, step: int, autocast, heartbeat=None) -> dict:
        """Every task on the model as it is at `step`: {"step", "eval_<task>": score, ...}; the report is
        written by rank 0. Compiled blocks run eagerly here (decoding's shapes would recompile them)."""
        rng = ckpt.rng_state()
        stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        try:
            with (stance("force_eager") if stance is not None else nullcontext()), autocast():
                report = evaluate(model, self.tokenizer, self.tasks, n=self.n, seed=EVAL_SEED,
                                  batch_size=self.batch_size, system_message=self.system_message,
                                  rank=self.rank, world_size=self.world,
                                  model_name=f"{self.out_dir} at step {step}", synced=is_distributed(),
                                  heartbeat=heartbeat)
        finally:
            model.train()
            ckpt.set_rng_state(rng)
        if self.rank == 0:
            write_report(report, self.report_path(step), markdown_table(report, f"{self.out_dir.name}, step {step}"))
        return {"step": step, **{metric_key(name): report[name]["accuracy"] for name in self.tasks}}
