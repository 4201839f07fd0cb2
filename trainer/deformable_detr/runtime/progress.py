"""Progress for long work: a tqdm bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

from .logging import get_logger

T = TypeVar("T")
log = get_logger("progress")


def progress(items: Iterable[T], total: Optional[int] = None, desc: str = "", enabled: bool = True,
             log_every_s: float = 10.0) -> Iterator[T]:
    """Yield `items`, showing progress on stderr; a bar only when stderr is a terminal."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    count = 0
    for item in items:
        yield item
        count += 1
        now = time.monotonic()
        if now - last >= log_every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s (%.1f/s)", desc, count, of, count / max(now - start, 1e-9))
    log.info("%s: done, %d in %.1fs", desc, count, time.monotonic() - start)
