"""One logger configuration for every task: plain, timestamped lines on stderr."""
from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (pytest and notebooks swap it), not the one seen at setup."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool = False) -> None:
    global _CONFIGURED
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("deformable_detr")
    root.setLevel(level)
    if not _CONFIGURED:
        handler = _CurrentStderrHandler()
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        # Records still propagate: the root logger has no handler in the CLI, and tools that attach
        # one (pytest's caplog, an embedding application) keep seeing them.
        _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("deformable_detr") else f"deformable_detr.{name}")
