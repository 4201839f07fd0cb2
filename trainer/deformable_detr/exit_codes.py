"""Every exit code the trainer (and the worker pod's launcher) ends with: its meaning and retry class.

The one home of these numbers: the CLI, the runtime, the operator's failure rules, the docs and the
tests read them from here. Retryable codes are >= 128, so a code this table does not know (a signal
death, 128 + N) is classed by the same rule.
"""
from __future__ import annotations

import dataclasses

# What kind of failure ended a run: the `class` of the termination message the trainer leaves
# (runtime/termination.py) and what the operator's runPolicy.failurePolicy rules match on.
FAILURE_CLASSES = {
    "OOM": "out of memory (CUDA or host)",
    "NCCL": "a collective failed or a peer was lost (NCCL, or gloo on CPUs)",
    "Hung": "no training step finished within train.step_timeout_s (the step watchdog)",
    "NaN": "the loss or the weights became NaN or infinite",
    "Data": "a dataset file missing, corrupt or unreadable",
    "Storage": "storage unavailable for now, or no space left",
    "Input": "a bad spec value, argument or file",
    "Unsupported": "a feature this machine cannot run",
    "Network": "rank 0's address could not be resolved or reached",
    "Stopped": "stopped by SIGTERM or Ctrl-C after saving a checkpoint",
    "Killed": "killed by a signal (the OOM killer's SIGKILL, a segfault)",
    "Bug": "an unexpected error (a traceback)",
}


@dataclasses.dataclass(frozen=True)
class ExitCode:
    code: int
    name: str
    meaning: str
    failure_class: str = "Bug"  # a key of FAILURE_CLASSES ("" for success)

    @property
    def retryable(self) -> bool:
        return is_retryable(self.code)


OK = ExitCode(0, "Done", "the task finished", "")
BUG = ExitCode(1, "Bug", "an unexpected error (a traceback): a bug to report")
BAD_INPUT = ExitCode(2, "BadInput", "bad input: a spec value, a missing or corrupt file; one line names it", "Input")
UNAVAILABLE_FEATURE = ExitCode(3, "FeatureUnavailable", "a feature this machine cannot run (TensorRT without a GPU)",
                               "Unsupported")
DIVERGED = ExitCode(4, "Diverged", "training's loss or weights became NaN or infinite; a restart would repeat it "
                    "(lower train.optim.lr); nothing newer than the last finite checkpoint was saved", "NaN")
INTERRUPTED = ExitCode(130, "Interrupted", "stopped by Ctrl-C after saving a checkpoint", "Stopped")
TERMINATED = ExitCode(143, "Terminated", "stopped by SIGTERM after saving a checkpoint", "Stopped")
PEER_LOST = ExitCode(200, "PeerLost", "lost contact with a peer (a worker killed, a node lost, a collective timed out, "
                     "no step within train.step_timeout_s)", "NCCL")
STORAGE_UNAVAILABLE = ExitCode(201, "StorageUnavailable", "storage that may come back (endpoint down, 5xx, throttling)",
                               "Storage")
DISK_FULL = ExitCode(202, "DiskFull", "no space or quota left to write a file; nothing written is lost", "Storage")
MASTER_UNRESOLVABLE = ExitCode(203, "MasterUnresolvable", "the worker pod never resolved or reached rank 0's address",
                               "Network")

ALL = (OK, BUG, BAD_INPUT, UNAVAILABLE_FEATURE, DIVERGED, INTERRUPTED, TERMINATED, PEER_LOST, STORAGE_UNAVAILABLE, DISK_FULL,
       MASTER_UNRESOLVABLE)
BY_CODE = {entry.code: entry for entry in ALL}


def is_retryable(code: int) -> bool:
    """128-255 (signals, and the codes above that say "try again") are retryable; 1-127 are permanent.
    A negative code (a process killed by a signal, as Python reports it) is retryable too."""
    return code >= 128 or code < 0


def failure_class(code: int) -> str:
    """The failure class an exit code implies when nothing more is known (a signal death: Killed)."""
    entry = BY_CODE.get(code)
    if entry is not None:
        return entry.failure_class
    return "Killed" if is_retryable(code) else "Bug"


def describe(code: int) -> str:
    """'ExitCode200 (PeerLost: lost contact ...)' for a known code, 'ExitCode137 (killed by signal 9)' else."""
    entry = BY_CODE.get(code)
    if entry is not None:
        return f"exit code {code} ({entry.name}: {entry.meaning})"
    if 128 < code < 128 + 65:
        return f"exit code {code} (killed by signal {code - 128})"
    return f"exit code {code}"
