"""SIGTERM (what Kubernetes, Slurm and `timeout` send) and SIGINT (Ctrl-C), the one home of how
tasks meet them. Every task: `Stopped` is raised, and the CLI says so in one line with exit code
143 (SIGTERM) or 130 (SIGINT); inside `signals_deferred` (a task writing its results and their
spec) it waits for the block to end. Training's loop: a `StopRequest` notes the first signal, so
training stops after the step and saves a checkpoint; a second SIGINT interrupts at once."""
from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Iterator, Optional

from .. import exit_codes
from .logging import get_logger

log = get_logger("signals")

EXIT_SIGTERM = exit_codes.TERMINATED.code
EXIT_SIGINT = exit_codes.INTERRUPTED.code


class _StopSignal:
    """What a stop by `signum` is called and the exit code it ends with (SIGINT: 130, else 143)."""
    signum: int

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM


class StopRequest(_StopSignal):
    """A flag raised by SIGTERM or a first SIGINT. Use as a context manager; the previous handlers
    come back on exit."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, object] = {}
        self.signum = signal.SIGTERM

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self) -> None:
        self._event.set()

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: do not wait for the step
        if not self._event.is_set():
            self.signum = signum
            log.warning("%s received: stopping after this step and saving a checkpoint%s",
                        signal.Signals(signum).name, " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self._event.set()

    def __enter__(self) -> "StopRequest":
        # Handlers can only be set from the main thread; elsewhere (a test's worker thread) stay passive.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous = {}


class Stopped(_StopSignal, BaseException):
    """SIGTERM or SIGINT ended a task between its steps (evaluate, inference, export, convert,
    gen_trt_engine; train before or after its loop). A BaseException, as KeyboardInterrupt: no
    `except Exception` on the way may swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_deferring = 0                     # depth of `signals_deferred` blocks
_pending: Optional[int] = None     # a signal that arrived inside one


def _raise_stopped(signum: int, _frame: Optional[FrameType]) -> None:
    global _pending
    if _deferring:
        _pending = _pending or signum
        return
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """For a whole task run (the CLI): SIGTERM/SIGINT raise `Stopped` in the main thread, which the
    CLI reports in one line with the signal's exit code. Train's `StopRequest` takes the signals
    over for its loop (stop after the step, save) and hands them back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A stop signal that arrives inside waits until the block has ended: files that belong together
    (a task's results and the spec that made them) are written all or none, as far as signals go."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        signum = None if _deferring else _pending
        if signum is not None:
            _pending = None
    if signum is not None:  # the block ended normally: now the signal stops the task
        raise Stopped(signum)
