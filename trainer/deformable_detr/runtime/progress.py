"""Progress for long work: a tqdm bar on a terminal, plain log lines otherwise.

A log line says what it counts and how fast over the last `window_s` seconds, with an ETA:
`epoch 1 of 0..3: 64/250 it, 2.41 it/s (last 30s), ETA 1m17s`.
"""
from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Iterable, Iterator, Optional, TypeVar

from .logging import get_logger

T = TypeVar("T")
log = get_logger("progress")


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class RateWindow:
    """Items per second over the last `window_s` seconds (whole run until then)."""

    def __init__(self, window_s: float = 30.0, start: Optional[float] = None, count: int = 0) -> None:
        self.window_s = window_s
        self.marks: collections.deque[tuple[float, int]] = collections.deque(
            [(time.monotonic() if start is None else start, count)])

    def add(self, now: float, count: int) -> None:
        self.marks.append((now, count))
        while len(self.marks) > 2 and now - self.marks[1][0] >= self.window_s:
            self.marks.popleft()

    def rate(self) -> float:
        (t0, c0), (t1, c1) = self.marks[0], self.marks[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


def progress_line(desc: str, count: int, total: Optional[int], unit: str, rate: float, window_s: float) -> str:
    of = f"/{total}" if total else ""
    line = f"{desc}: {count}{of} {unit}, {rate:.2f} {unit}/s (last {window_s:.0f}s)"
    if total and rate > 0:
        line += f", ETA {format_duration((total - count) / rate)}"
    return line


def progress(items: Iterable[T], total: Optional[int] = None, desc: str = "", enabled: bool = True,
             log_every_s: float = 10.0, unit: str = "it", initial: int = 0, window_s: float = 30.0) -> Iterator[T]:
    """Yield `items`, showing progress on stderr; a bar only when stderr is a terminal.

    `initial` items were done before (a resumed epoch): counts start there, rates do not include them.
    """
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True, unit=unit, initial=initial)
        return
    start = last = time.monotonic()
    window = RateWindow(window_s, start, initial)
    count = initial
    for item in items:
        yield item
        count += 1
        now = time.monotonic()
        window.add(now, count)
        if now - last >= log_every_s:
            last = now
            log.info("%s", progress_line(desc, count, total, unit, window.rate(), window_s))
    elapsed = time.monotonic() - start
    log.info("%s: done, %d %s in %.1fs (%.2f %s/s)", desc, count - initial, unit, elapsed,
             (count - initial) / max(elapsed, 1e-9), unit)


class TransferProgress:
    """boto3 transfer callback: a log line every `every_s` seconds, so long transfers show progress."""

    def __init__(self, what: str, logger: logging.Logger, total: Optional[int] = None, every_s: float = 10.0):
        self.what, self.log, self.total, self.every_s = what, logger, total, every_s
        self.done = 0
        self.started = self.last = time.monotonic()
        self.reported = False
        self._lock = threading.Lock()  # called from the transfer's worker threads

    def __call__(self, amount: int) -> None:
        with self._lock:
            self.done += amount
            now = time.monotonic()
            if now - self.last < self.every_s:
                return
            self.last, self.reported = now, True
        of = f" of {self.total / 1e6:.1f}" if self.total else ""
        self.log.info("%s: %.1f%s MB (%.1f MB/s)", self.what, self.done / 1e6, of, self.done / 1e6 / (now - self.started))

    def finish(self) -> None:
        if self.reported:
            self.log.info("%s: done, %.1f MB in %.1fs", self.what, self.done / 1e6, time.monotonic() - self.started)
