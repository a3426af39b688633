"""Watching a training run: a signal asks the loop to stop cleanly, a step that hangs leaves its stacks.

Stopping: a signal asks the loop to save a checkpoint after the step it is in.

SIGTERM (a scheduler preempting or ending the job; torchrun passes it to its workers), SIGUSR1 (what
SLURM's `--signal=USR1@120` sends ahead of the time limit) and a first ^C set a flag; the loop reads it
after each optimiser step (the ranks agree through the step's own all-reduce), saves, and stops with
`Interrupted`. A second ^C interrupts at once, as Python's default does. Outside the main thread (where
handlers cannot be set) nothing is installed and the run behaves as before.
"""

from __future__ import annotations

import faulthandler
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
