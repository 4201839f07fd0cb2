"""The termination message: what ended a failed run, where Kubernetes reads it into the pod's status.

A failing process writes one JSON line (failure class from exit_codes.FAILURE_CLASSES, exit code,
step, rank and a one-line reason) followed by its last log lines to `/dev/termination-log` (the
kubelet's file; `DDETR_TERMINATION_LOG` names another). The kubelet keeps 4096 bytes of it as the
container's `state.terminated.message`; the operator's failure rules and status read it there.
The first process of a container to fail writes it (the cause; its peers fail after it), so a
launcher clears the file when it starts and its workers only fill an empty one.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import traceback
from typing import Iterator, Optional

from .. import exit_codes

PATH_ENV = "DDETR_TERMINATION_LOG"
KUBELET_PATH = "/dev/termination-log"
MAX_BYTES = 4096  # what the kubelet keeps of a termination message
TAIL_LINES = 20

_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
_last_step: Optional[int] = None


def path() -> Optional[str]:
    """Where the message goes: DDETR_TERMINATION_LOG, else the kubelet's file when it exists."""
    configured = os.environ.get(PATH_ENV)
    if configured:
        return configured
    return KUBELET_PATH if os.path.isfile(KUBELET_PATH) else None


def note_step(step: int) -> None:
    """The last training step this process finished, for the message."""
    global _last_step
    _last_step = step


def classify(code: int, err: Optional[BaseException] = None) -> str:
    """The failure class of a run ending with `code` (and `err`, when known): the error's kind where
    it says more than the code (a CUDA OOM is exit 1 but class OOM), else the code's class."""
    for current in _chain(err):
        name = type(current).__name__
        if name == "OutOfMemoryError" or "out of memory" in str(current).lower():
            return "OOM"
        if name in ("UnreadableImageError", "UnidentifiedImageError"):
            return "Data"
        if name == "StorageError":
            return "Storage"
    return exit_codes.failure_class(code)


def _chain(err: Optional[BaseException]) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def message(code: int, failure_class: str, reason: str, step: Optional[int] = None) -> str:
    """The message text: the JSON head line, then the last log lines, within MAX_BYTES."""
    head = json.dumps({"class": failure_class, "exitCode": code, "step": step if step is not None else _last_step,
                       "rank": _rank(), "reason": " ".join(reason.split())[:300]}, separators=(",", ":"))
    text = head
    for line in reversed(list(_tail)):  # the newest lines first, so they survive the cut
        if len((text + "\n" + line).encode()) > MAX_BYTES:
            break
        text = text + "\n" + line
    lines = text.split("\n")
    return "\n".join([lines[0], *reversed(lines[1:])]) + "\n"


def _rank() -> Optional[int]:
    value = os.environ.get("RANK")
    return int(value) if value is not None and value.isdigit() else None


def write(code: int, failure_class: str, reason: str, step: Optional[int] = None) -> None:
    """Leave the message unless an earlier failure of this container left one; never raises."""
    target = path()
    if target is None:
        return
    try:
        with open(target, "a+", encoding="utf-8") as fh:
            fh.seek(0)
            if fh.read(1):
                return  # the first failure is the cause
            fh.write(message(code, failure_class, reason, step))
    except OSError:
        pass  # exiting with the code matters more than the message


class _TailHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            _tail.append(f"{record.levelname} {record.getMessage()}"[:500])


@contextlib.contextmanager
def recorded(launcher: bool) -> Iterator[None]:
    """Around a whole command: keep its last log lines, and on a failing exit (a non-zero
    SystemExit or an exception) write the termination message. `launcher`: a process not started by
    torchrun, which clears a message left by an earlier run first."""
    target = path()
    if launcher and target is not None and target != KUBELET_PATH:
        with contextlib.suppress(OSError):
            open(target, "w").close()
    handler = _TailHandler(logging.INFO)
    logger = logging.getLogger("deformable_detr")
    logger.addHandler(handler)
    try:
        yield
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if code != 0:
            write(code, classify(code), _last_error_line() or exit_codes.describe(code))
        raise
    except BaseException as err:
        code = exit_codes.INTERRUPTED.code if isinstance(err, KeyboardInterrupt) else exit_codes.BUG.code
        for line in traceback.format_exception(err)[-6:]:
            _tail.extend(part for part in line.rstrip("\n").split("\n") if part.strip())
        write(code, classify(code, err), f"{type(err).__name__}: {str(err).strip()[:250]}")
        raise
    finally:
        logger.removeHandler(handler)


def _last_error_line() -> Optional[str]:
    """The newest ERROR line logged, as the reason (the CLI's one-line error goes to stderr as print)."""
    return next((line[len("ERROR "):] for line in reversed(_tail) if line.startswith("ERROR ")), None)
