"""SIGTERM (what Kubernetes, Slurm and `timeout` send) and a first SIGINT (Ctrl-C): note it, so
training stops at the next step and saves a checkpoint; a second SIGINT interrupts at once."""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

from .. import exit_codes
from .logging import get_logger

log = get_logger("signals")

EXIT_SIGTERM = exit_codes.TERMINATED.code
EXIT_SIGINT = exit_codes.INTERRUPTED.code


class StopRequest:
    """A flag raised by SIGTERM or a first SIGINT. Use as a context manager; the previous handlers
    come back on exit."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, object] = {}
        self.signum = signal.SIGTERM

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM

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
