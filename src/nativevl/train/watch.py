"""Watching a training run: a signal asks the loop to stop cleanly, a step that hangs leaves its stacks,
a step that runs out of device memory is marked so that a resume can pass it.

Stopping: a signal asks the loop to save a checkpoint after the step it is in.

SIGTERM (a scheduler preempting or ending the job; torchrun passes it to its workers), SIGUSR1 (what
SLURM's `--signal=USR1@120` sends ahead of the time limit) and a first ^C set a flag; the loop reads it
after each optimiser step (the ranks agree through the step's own all-reduce), saves, and stops with
`Interrupted`. A second ^C interrupts at once, as Python's default does. Outside the main thread (where
handlers cannot be set) nothing is installed and the run behaves as before.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT)
                if s is not None)


class Interrupted(RuntimeError):
    """A run stopped by a signal after saving its checkpoint: the same command resumes it."""


class StopRequests:
    """Context manager: `.signal` is the name of the first stopping signal received, None before."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # asked twice: now
        if self.signal is None:
            print(f"\n{signal.Signals(signum).name}: stopping after this step, once its checkpoint is saved"
                  + (" (^C again: at once, unsaved)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)
        self.signal = self.signal or signal.Signals(signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class HangWatchdog:
    """A step that takes longer than `timeout` seconds (a collective waiting for a rank that died or
    diverged, a stuck data worker, a hung filesystem) gets every thread's Python stack written to `path`,
    again every `timeout` seconds while it lasts (faulthandler: it works while the interpreter is stuck in
    C code). The run is not stopped: compare the ranks' files to see who waits where. `path` is this
    run's own file (named with its start time); it is removed at the end if nothing was written.
    faulthandler has one timer per process: while training, this one replaces any other's (pytest's
    faulthandler_timeout, say), and closing cancels it. A legitimately slow step (the first one, which
    compiles; a large checkpoint) can also write a dump."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path, self.timeout, self.file = path, timeout, None
        if timeout > 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")

    def arm(self) -> None:
        if self.file is not None:
            faulthandler.dump_traceback_later(self.timeout, repeat=True, file=self.file)

    def close(self) -> None:
        if self.file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self.file.close()
        self.file = None
        if self.path.stat().st_size == 0:
            self.path.unlink()
        else:
            log.warning("a step took longer than hang_timeout=%gs: the stacks are in %s", self.timeout, self.path)


class OutOfMemory(RuntimeError):
    """A step's batches ran out of device memory (they are marked, MemoryMarks, for a resume to skip), or
    the optimiser's update did."""

    BATCH_ADVICE = ("The same command with --max_skipped_steps=1 (or more) resumes past these batches; or make "
                    "room: --activation_checkpointing=true, a smaller --max_tokens / --max_tiles, more GPUs "
                    "(`nativevl plan` estimates each)")
    OPTIMISER_ADVICE = ("AdamW keeps 2 float32 values per trainable parameter, made at its first step. `nativevl "
                        "plan` counts each part; train fewer parameters (--stage.*.mode=lora or frozen), or shard "
                        "them over more GPUs")


class MemoryMarks:
    """Steps whose batches ran out of device memory: `oom-step{N}-rank{r}.json` files in the run folder,
    each naming the records of that rank's batches (their stream indices, sources, tokens and tiles).

    The stream is deterministic, so a run resumed before step N meets the same batches at step N and
    runs out of memory again; with --max_skipped_steps it skips them instead (every rank together, as for
    a non-finite step). A step is skipped only while its batches hold the marked records: a run whose data
    changed since trains them. `steps` is read by rank 0 and sent to every rank (`share`), so the ranks
    agree; a mark written by a rank on another node counts only where the run folder is shared (as the
    checkpoints need it to be)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.steps: dict[int, list[list[list[int]]]] = {}  # step -> each marking rank's batches' record indices
        for path in sorted(out_dir.glob("oom-step*-rank*.json")):
            try:
                mark = json.loads(path.read_text(encoding="utf-8"))
                self.steps.setdefault(int(mark["step"]), []).append(mark["indices"])
            except (OSError, ValueError, KeyError, TypeError):  # cut short by the crash it records
                log.warning("%s is unreadable: ignored", path)

    def share(self, broadcast) -> None:
        """Rank 0's marks on every rank (`broadcast`: parallel.broadcast_object)."""
        self.steps = {int(k): v for k, v in broadcast(self.steps).items()}

    def holds(self, step: int, micro: list) -> bool:
        """Whether this rank's batches for `step` are the records some rank's batches were when it ran out."""
        return [list(b.indices) for b in micro] in self.steps.get(step, [])

    def record(self, step: int, rank: int, micro: list, error: BaseException) -> str:
        """Write the mark of this rank's batches at `step`; returns what to tell (the step, the error, the
        batches' sizes, the mark's path)."""
        path = self.out_dir / f"oom-step{step}-rank{rank}.json"
        mark = {"step": step, "rank": rank, "indices": [list(b.indices) for b in micro],
                "sources": [list(b.sources) for b in micro], "tokens": [b.num_tokens for b in micro],
                "tiles": [b.num_tiles for b in micro], "error": str(error)[:2000]}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(mark) + "\n", encoding="utf-8")
        tmp.replace(path)
        self.steps.setdefault(step, []).append(mark["indices"])
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return (f"step {step} ran out of device memory (rank {rank}: {first}; its batches: {mark['tokens']} tokens, "
                f"{mark['tiles']} tiles; marked in {path})")
