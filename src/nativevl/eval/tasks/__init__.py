"""Evaluation tasks (each an EvalTask: tasks/base.py): toy-world families by name, benchmark and custom sets
by file (`.tsv`, `.jsonl`: tasks/files.py)."""

from pathlib import Path

from nativevl.data.toyworld.tasks import FAMILIES
from nativevl.eval.tasks.files import DEFAULT_FRAMES, FileTask
from nativevl.eval.tasks.toyworld import ToyWorldTask

FILE_SUFFIXES = (".tsv", ".jsonl")


def get_task(name: str, max_num: int | None = None, num_frames: int = DEFAULT_FRAMES):
    """A toy-world family, or an evaluation file (`max_num`: tiles per question for files, shared by its
    images; None: as InternVL's VLMEvalKit model tiles that file; the toy tasks are asked with one
    tile, as they are trained; `num_frames`: frames of a file's video questions)."""
    if name in FAMILIES:
        return ToyWorldTask(name)
    if Path(name).suffix in FILE_SUFFIXES:
        if not Path(name).is_file():
            raise FileNotFoundError(f"evaluation file {name} does not exist")
        if max_num is not None and max_num < 1:
            raise ValueError(f"max_num must be >= 1 tile, got {max_num}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 frame, got {num_frames}")
        return FileTask(name, max_num, num_frames)
    raise ValueError(f"unknown task {name!r}; known: {sorted(FAMILIES)}, or a benchmark file "
                     f"({', '.join(FILE_SUFFIXES)})")


TASK_NAMES = tuple(FAMILIES)
