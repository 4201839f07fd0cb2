"""Progress for long work: a tqdm bar on a terminal, plain log lines otherwise.

A log line says what it counts and how fast over the last `window_s` seconds, with an ETA:
`epoch 1 of 0..3: 64/250 it, 2.41 it/s (last 30s), ETA 1m17s`. Rates leave out the first items of a
loop (`WARMUP_ITEMS`): a first training step that builds kernels and starts data-loader workers once
made a 6-minute run's line promise 3h02m (issue 33). `StepRate` is the whole run's estimate.
"""
from __future__ import annotations

import collections
import itertools
import logging
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

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


WARMUP_ITEMS = 2  # items of a loop left out of its rate: start-up costs, not the pace


class StepRate:
    """The recent pace of training, for a run's percent done and finish time: an exponentially weighted
    mean of step durations (weight `smoothing` on the newest) and of the pause at each epoch's end
    (validation, checkpoint), leaving out the first `warmup` steps of a launch (compilation, allocator and
    data-loader start-up). A pure estimator: the caller passes the measured seconds."""

    def __init__(self, warmup: int = WARMUP_ITEMS, smoothing: float = 0.1) -> None:
        self.warmup, self.smoothing = warmup, smoothing
        self.seen = 0
        self.step_seconds: Optional[float] = None  # None while warming up
        self.images_per_step: Optional[float] = None
        self.pause_seconds = 0.0  # nothing known before the first epoch's end

    def _mean(self, old: Optional[float], new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def add_step(self, seconds: float, images: int = 0) -> None:
        self.seen += 1
        if self.seen <= self.warmup:
            return
        self.step_seconds = self._mean(self.step_seconds, seconds)
        self.images_per_step = self._mean(self.images_per_step, float(images))

    def add_pause(self, seconds: float) -> None:
        """The time between an epoch's last step and the next one's first (validation and checkpoint)."""
        self.pause_seconds = seconds if self.pause_seconds == 0.0 else self._mean(self.pause_seconds, seconds)

    @property
    def images_per_second(self) -> Optional[float]:
        if self.step_seconds is None or self.images_per_step is None or self.step_seconds <= 0:
            return None
        return self.images_per_step / self.step_seconds

    def eta_seconds(self, steps_left: int, epoch_ends_left: int = 0) -> Optional[float]:
        """Seconds until `steps_left` steps and `epoch_ends_left` epoch ends are done; None while warming up."""
        if self.step_seconds is None:
            return None
        return steps_left * self.step_seconds + epoch_ends_left * self.pause_seconds


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


def progress_line(desc: str, count: int, total: Optional[int], unit: str, rate: Optional[float],
                  window_s: float) -> str:
    """One progress log line; `rate` None: still in the warm-up items, no rate or ETA to tell yet."""
    of = f"/{total}" if total else ""
    if rate is None:
        return f"{desc}: {count}{of} {unit}, warming up (no rate yet)"
    line = f"{desc}: {count}{of} {unit}, {rate:.2f} {unit}/s (last {window_s:.0f}s)"
    if total and rate > 0:
        line += f", ETA {format_duration((total - count) / rate)}"
    return line


def progress(items: Iterable[T], total: Optional[int] = None, desc: str = "", enabled: bool = True,
             log_every_s: float = 10.0, unit: str = "it", initial: int = 0, window_s: float = 30.0,
             note: Optional[Callable[[], str]] = None) -> Iterator[T]:
    """Yield `items`, showing progress on stderr; a bar only when stderr is a terminal.

    `initial` items were done before (a resumed epoch): counts start there, rates do not include them.
    `note()` is added to each log line (training: the whole run's percent and ETA).
    """
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = dict(total=total, desc=desc, dynamic_ncols=True, unit=unit)
        iterator, count = iter(items), initial
        # The warm-up items on a bar of their own with no rate: tqdm's rate starts at its first item.
        with tqdm(initial=count, leave=False, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [warming up]",
                  **bar) as warming:
            for item in itertools.islice(iterator, WARMUP_ITEMS):
                yield item
                count += 1
                warming.update()
        yield from tqdm(iterator, initial=count, **bar)
        return
    start = last = time.monotonic()
    window: Optional[RateWindow] = None  # from the end of the warm-up items on
    count = initial
    for item in items:
        yield item
        count += 1
        now = time.monotonic()
        if window is None:
            if count - initial >= WARMUP_ITEMS:
                window = RateWindow(window_s, now, count)
        else:
            window.add(now, count)
        if now - last >= log_every_s:
            last = now
            line = progress_line(desc, count, total, unit, window.rate() if window and len(window.marks) > 1 else None,
                                 window_s)
            log.info("%s%s", line, note() if note else "")
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
