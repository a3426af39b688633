"""Evaluation inside training: `nativevl eval`'s tasks (toy-world families, benchmark and custom sets from
files) on the model being trained, every `eval_every` steps and at the end.

Each evaluation writes DIR/evals/step-NNNNNN.json (+ .md), the report `nativevl eval` writes, so two
steps (or a step and another model's report with the same n, seed and system message: the training
data's) compare question by question with `nativevl compare`; its accuracies go to metrics.jsonl
(`eval_<task>`) and tensorboard's eval/.
Evaluating changes nothing in the training run: dropout is off, the RNG is restored, the model goes back
to training mode. Several processes evaluate together: each generates for its share of the questions
with the sharded model, in step with the others (eval/runner.py `predict`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nativevl.eval.runner import evaluate, folder_identity, markdown_table, write_report
from nativevl.eval.tasks import FILE_SUFFIXES, get_task
from nativevl.train import checkpoint as ckpt
from nativevl.train.parallel import broadcast_object, is_distributed

log = logging.getLogger(__name__)

def task_names(spec: str) -> list[str]:
    """The comma-separated task list of --eval_tasks."""
    return [name.strip() for name in spec.split(",") if name.strip()]


def label(task: str) -> str:
    """A task's short name: a toy family's, or a file's name without its folder and suffix."""
    return Path(task).stem if Path(task).suffix in FILE_SUFFIXES else task


def metric_key(task: str) -> str:
    """`eval_<task>` in metrics.jsonl."""
    return "eval_" + label(task)


class TrainingEval:
    """The run's evaluation: its tasks checked (and a file's first questions read) when it is made, so a
    wrong name or a missing file stops the run before its first step rather than at its first evaluation."""

    def __init__(self, spec: str, *, every: int, n: int, batch_size: int, tokenizer, out_dir: str | Path,
                 rank: int, world: int, seed: int, system_message: str | None = None) -> None:
        self.tasks = task_names(spec)
        if not self.tasks:
            raise ValueError(f"eval_tasks {spec!r} names no task")
        keys = [metric_key(t) for t in self.tasks]
        if len(set(keys)) < len(keys):
            raise ValueError(f"eval_tasks {spec!r} holds two tasks of the same name: {sorted(keys)}")
        if "eval_mean" in keys:  # the name of the tasks' mean (--best_metric=eval_mean)
            raise ValueError(f"eval_tasks: a task named 'mean' ({self.tasks[keys.index('eval_mean')]}) would read as "
                             "the mean of the tasks: rename the file")
        for name in self.tasks:
            try:
                get_task(name).load(n, seed)
            except (OSError, ValueError) as e:
                raise ValueError(f"eval_tasks: {name}: {e}") from None
        self.every, self.n, self.batch_size, self.seed = every, n, batch_size, seed
        self.tokenizer, self.out_dir, self.rank, self.world = tokenizer, Path(out_dir), rank, world
        self.system_message = system_message  # the training data's: the model is asked as it is taught

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == max_steps

    def report_path(self, step: int) -> Path:
        return self.out_dir / "evals" / f"step-{step:06d}.json"

    @property
    def basis(self) -> dict:
        """What the scores are measured on (files by path and a fingerprint of their contents' stamps)."""
        return {"tasks": [folder_identity(t) if Path(t).suffix in FILE_SUFFIXES else t for t in self.tasks],
                "n": self.n, "seed": self.seed, "system": self.system_message}

    def resume(self, step: int, max_steps: int) -> bool:
        """A run starting at `step` (a checkpoint's, or 0): the reports of later steps, made by a run that
        stopped before its next checkpoint, go (those steps are trained again, as metrics.jsonl drops their
        lines); True when an evaluation due at `step` has no report (the run stopped after that step's
        checkpoint, before its evaluation ended), for the caller to run it first. Rank 0 looks; all agree."""
        if self.rank == 0:
            stale = [p for p in (self.out_dir / "evals").glob("step-*.json") if step_of(p) > step]
            for path in stale:
                path.unlink()
                path.with_suffix(".md").unlink(missing_ok=True)
            if stale:
                log.info("removed %d evaluation report(s) of steps after %d (trained again)", len(stale), step)
                plot_scores(self.out_dir / "evals")
        return step > 0 and self.due(step, max_steps) and bool(broadcast_object(not self.report_path(step).is_file()))

    @torch.no_grad()
    def __call__(self, model, step: int, autocast, heartbeat=None) -> tuple[dict, dict]:
        """Every task on the model as it is at `step`: ({"step", "eval_<task>": score, ...}, the report).
        Compiled blocks run eagerly here (decoding's shapes would recompile them)."""
        rng = ckpt.rng_state()
        try:
            with _eager(), autocast():
                report = evaluate(model, self.tokenizer, self.tasks, n=self.n, seed=self.seed,
                                  batch_size=self.batch_size, system_message=self.system_message,
                                  rank=self.rank, world_size=self.world,
                                  model_name=f"{self.out_dir} at step {step}", synced=is_distributed(),
                                  heartbeat=heartbeat)
        finally:
            model.train()
            ckpt.set_rng_state(rng)
        return {"step": step, **{metric_key(name): report[name]["accuracy"] for name in self.tasks}}, report

    def write(self, report: dict, step: int) -> None:
        """Rank 0: evals/step-N.json (+ .md) and the plot of every step so far. A report or plot that cannot
        be written (disk full, say) is logged; the training run goes on (its scores are in metrics.jsonl)."""
        if self.rank != 0:
            return
        try:
            write_report(report, self.report_path(step), markdown_table(report, f"{self.out_dir.name}, step {step}"))
        except OSError as e:
            log.error("step %d: the evaluation report %s was not written (%s)", step, self.report_path(step), e)
            return
        try:
            plot_scores(self.out_dir / "evals")
        except Exception as e:  # noqa: BLE001 - a plot is never worth stopping a training run for
            log.warning("step %d: evals/scores.png was not drawn (%s: %s)", step, type(e).__name__, e)


def _eager():
    """Compiled functions run eagerly inside: torch.compiler.set_stance (torch >= 2.6), or dynamo disabled."""
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is not None:
        return stance("force_eager")
    from torch import _dynamo

    return _dynamo.config.patch(disable=True)


def step_of(path: Path) -> int:
    """The step of an evaluation report's name (step-000500.json: 500; -1 for another name)."""
    try:
        return int(path.stem.removeprefix("step-"))
    except ValueError:
        return -1


def read_reports(folder: Path) -> list[tuple[int, dict]]:
    """(step, report) of every evaluation report in `folder`, by step; a damaged one (being written by
    someone else, say) is left out."""
    out = []
    for path in sorted((p for p in folder.glob("step-*.json") if step_of(p) >= 0), key=step_of):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict):
            out.append((step_of(path), report))
    return out


def plot_scores(folder: Path) -> Path | None:
    """folder/scores.png: each task's score at every evaluated step (the folder's step-N.json reports),
    its 95% interval shaded and its chance level dotted. None when there is nothing to plot."""
    series: dict[str, list[tuple[int, dict]]] = {}
    for step, report in read_reports(folder):
        for task, entry in report.items():
            if isinstance(entry, dict) and "accuracy" in entry:
                series.setdefault(task, []).append((step, entry))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for task, points in series.items():
        steps = [s for s, _ in points]
        line, = ax.plot(steps, [e["accuracy"] for _, e in points], "o-", markersize=3, linewidth=1.2,
                        label=label(task))
        ax.fill_between(steps, [e["ci95"][0] for _, e in points], [e["ci95"][1] for _, e in points],
                        color=line.get_color(), alpha=0.12, linewidth=0)
        ax.axhline(points[-1][1]["chance"], color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("score (95% interval shaded; dotted: chance)")
    ax.set_title(f"evaluation during training: {folder.parent.name}")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = folder / "scores.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
