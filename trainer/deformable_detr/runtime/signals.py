"""SIGTERM, what Kubernetes sends before it kills a pod: note it, so training stops at the next step."""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

from .logging import get_logger

log = get_logger("signals")

# Exit code of a run stopped by SIGTERM after saving its checkpoint (128 + SIGTERM, as a signal death reads).
EXIT_SIGTERM = 143


class StopRequest:
    """A flag raised by SIGTERM. Use as a context manager; the previous handler comes back on exit."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self) -> None:
        self._event.set()

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        if not self._event.is_set():
            log.warning("SIGTERM received: stopping after this step and saving a checkpoint")
        self._event.set()

    def __enter__(self) -> "StopRequest":
        # Handlers can only be set from the main thread; elsewhere (a test's worker thread) stay passive.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
