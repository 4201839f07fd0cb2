"""The step watchdog (train.step_timeout_s): a rank that finishes no training step for that long is
hung (a stuck collective, a dead or stopped peer, a stalled data read). It writes every thread's
Python stack to its log and to `{train results}/hangs/`, leaves a termination message of class
Hung and exits with the retryable lost-peer code, so the gang restarts from its newest checkpoint
instead of holding its GPUs forever.

A thread, not a signal: it runs while the main thread waits in C (a collective, a read) with the
GIL released, and the stacks show where each thread is.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import threading
import time
import traceback
from typing import Callable, Iterator, Optional

from .. import exit_codes
from . import storage, termination
from .distributed import TIMEOUT_ENV, record_exit_code
from .logging import get_logger

log = get_logger("watchdog")

HANGS_FOLDER = "hangs"
WRITE_WAIT_S = 30  # how long the dump's upload may take before the rank exits anyway (storage may hang too)

_active: Optional["StepWatchdog"] = None


def all_stacks() -> str:
    """Every thread's Python stack, innermost call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {names.get(ident, '?')} ({ident}):\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


class StepWatchdog:
    def __init__(self, timeout_s: float, results_dir: str, rank: int,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.timeout_s = timeout_s
        self.results_dir = results_dir
        self.rank = rank
        self._exit = exit
        self._last_beat = time.monotonic()
        self._last_step: Optional[int] = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)

    def beat(self, step: int) -> None:
        self._last_beat = time.monotonic()
        self._last_step = step

    def start(self) -> "StepWatchdog":
        self._last_beat = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        every = max(0.05, min(5.0, self.timeout_s / 10))
        while not self._stopped.wait(every):
            idle = time.monotonic() - self._last_beat
            if idle >= self.timeout_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        after = f"after step {self._last_step}" if self._last_step is not None else "since training started"
        stacks = all_stacks()
        where = self._save(stacks)
        reason = (f"no training step finished in {idle:.0f} s {after} (train.step_timeout_s {self.timeout_s:g}); "
                  f"rank {self.rank}'s stacks are in the log" + (f" and {where}" if where else ""))
        log.error("%s; exiting %d so that the gang restarts from its newest checkpoint\n%s", reason,
                  exit_codes.PEER_LOST.code, stacks)
        termination.write(exit_codes.PEER_LOST.code, "Hung", reason, step=self._last_step)
        with contextlib.suppress(OSError):
            record_exit_code(exit_codes.PEER_LOST.code)  # what the launcher reports
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self._exit(exit_codes.PEER_LOST.code)

    def _save(self, stacks: str) -> Optional[str]:
        """The stacks into the results folder (an artifact kept with the run); None when that failed."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = storage.join(self.results_dir, HANGS_FOLDER, f"rank{self.rank}-step{self._last_step}-{stamp}.txt")
        done: list[str] = []

        def write() -> None:
            if not storage.is_remote(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            storage.write_text(path, stacks)
            done.append(path)
        writer = threading.Thread(target=write, name="hang-dump", daemon=True)
        writer.start()
        writer.join(WRITE_WAIT_S)
        return done[0] if done else None


@contextlib.contextmanager
def guard(timeout_s: Optional[float], results_dir: str, rank: int) -> Iterator[Optional[StepWatchdog]]:
    """Watch the steps of the block (nothing when timeout_s is None); `beat` reports each step."""
    global _active
    if not timeout_s:
        yield None
        return
    dog = StepWatchdog(timeout_s, results_dir, rank).start()
    _active = dog
    try:
        yield dog
    finally:
        dog.stop()
        _active = None


def beat(step: int) -> None:
    """A training step finished: for the watchdog, and for the termination message's step."""
    termination.note_step(step)
    if _active is not None:
        _active.beat(step)


COLLECTIVE_TIMEOUT_FACTOR = 2


def collective_timeout_from(step_timeout_s: Optional[int]) -> None:
    """A collective waits at most twice train.step_timeout_s for its peers (unless DDETR_DIST_TIMEOUT_S
    says otherwise): a bound on every wait, and long enough that the watchdog, which dumps the stacks,
    acts first. Set before the process group exists, and inherited by torchrun's workers."""
    if step_timeout_s:
        os.environ.setdefault(TIMEOUT_ENV, str(int(step_timeout_s) * COLLECTIVE_TIMEOUT_FACTOR))
