"""Every exit code the trainer (and the worker pod's launcher) ends with: its meaning and retry class.

The one home of these numbers: the CLI, the runtime, the operator's failure rules, the docs and the
tests read them from here. Retryable codes are >= 128, so a code this table does not know (a signal
death, 128 + N) is classed by the same rule.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ExitCode:
    code: int
    name: str
    meaning: str

    @property
    def retryable(self) -> bool:
        return is_retryable(self.code)


OK = ExitCode(0, "Done", "the task finished")
BUG = ExitCode(1, "Bug", "an unexpected error (a traceback): a bug to report")
BAD_INPUT = ExitCode(2, "BadInput", "bad input: a spec value, a missing or corrupt file; one line names it")
UNAVAILABLE_FEATURE = ExitCode(3, "FeatureUnavailable", "a feature this machine cannot run (TensorRT without a GPU)")
DIVERGED = ExitCode(4, "Diverged", "training's loss or weights became NaN or infinite; a restart would repeat it "
                    "(lower train.optim.lr); nothing newer than the last finite checkpoint was saved")
INTERRUPTED = ExitCode(130, "Interrupted", "stopped by Ctrl-C after saving a checkpoint")
TERMINATED = ExitCode(143, "Terminated", "stopped by SIGTERM after saving a checkpoint")
PEER_LOST = ExitCode(200, "PeerLost", "lost contact with a peer (a worker killed, a node lost, a collective timed out)")
STORAGE_UNAVAILABLE = ExitCode(201, "StorageUnavailable", "storage that may come back (endpoint down, 5xx, throttling)")
DISK_FULL = ExitCode(202, "DiskFull", "no space or quota left to write a file; nothing written is lost")
MASTER_UNRESOLVABLE = ExitCode(203, "MasterUnresolvable", "the worker pod never resolved or reached rank 0's address")

ALL = (OK, BUG, BAD_INPUT, UNAVAILABLE_FEATURE, DIVERGED, INTERRUPTED, TERMINATED, PEER_LOST, STORAGE_UNAVAILABLE, DISK_FULL,
       MASTER_UNRESOLVABLE)
BY_CODE = {entry.code: entry for entry in ALL}


def is_retryable(code: int) -> bool:
    """128-255 (signals, and the codes above that say "try again") are retryable; 1-127 are permanent.
    A negative code (a process killed by a signal, as Python reports it) is retryable too."""
    return code >= 128 or code < 0


def describe(code: int) -> str:
    """'ExitCode200 (PeerLost: lost contact ...)' for a known code, 'ExitCode137 (killed by signal 9)' else."""
    entry = BY_CODE.get(code)
    if entry is not None:
        return f"exit code {code} ({entry.name}: {entry.meaning})"
    if 128 < code < 128 + 65:
        return f"exit code {code} (killed by signal {code - 128})"
    return f"exit code {code}"
