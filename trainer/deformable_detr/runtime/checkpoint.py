"""Training checkpoints: TAO's names, a `dd_model_latest.pth` pointer, auto-resume discovery, RNG state.

A checkpoint is a dict {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "step",
"batches_done", "epoch_finished", "rng", "spec"} written through
`checkpoint_io.save_object` (atomic, encrypted with a key). The numbered file is
complete before `dd_model_latest.pth` is replaced, so the pointer never names a
half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from . import storage
from .checkpoint_io import load_object, save_object
from .files import atomic_path

LATEST_NAME = "dd_model_latest.pth"
_CHECKPOINT_RE = re.compile(r"^model_epoch_(\d{3,})_step_(\d{5,})\.pth$")


def checkpoint_name(epoch: int, step: int) -> str:
    """TAO's file name for the checkpoint taken in (0-based) `epoch` after `step` optimizer steps."""
    return f"model_epoch_{epoch:03d}_step_{step:05d}.pth"


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A checkpoint file found in a results folder, ordered by (step, epoch)."""

    step: int
    epoch: int
    path: str


def parse_checkpoint_name(name: str) -> Optional[tuple[int, int]]:
    """(epoch, step) of a TAO checkpoint file name, None for any other name."""
    match = _CHECKPOINT_RE.match(os.path.basename(name))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if storage.is_remote(folder) else os.path.join(folder, name)


def _list_names(folder: str) -> list[str]:
    if storage.is_remote(folder):
        prefix = folder.rstrip("/") + "/"
        # The listing is recursive: keep the folder's own files, not those of its subfolders.
        return [p[len(prefix):] for p in storage.list_files(prefix) if "/" not in p[len(prefix):]]
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def list_checkpoints(folder: str) -> list[CheckpointRef]:
    """Every TAO-named checkpoint in `folder`, oldest first."""
    refs = []
    for name in _list_names(folder):
        parsed = parse_checkpoint_name(name)
        if parsed is not None:
            refs.append(CheckpointRef(step=parsed[1], epoch=parsed[0], path=_join(folder, name)))
    return sorted(refs)


def find_resume_checkpoint(folder: str) -> Optional[str]:
    """The newest checkpoint in `folder` (numbered files first, else the latest pointer), or None."""
    refs = list_checkpoints(folder)
    if refs:
        return refs[-1].path
    latest = _join(folder, LATEST_NAME)
    return latest if storage.exists(latest) else None


def load_newest_readable(folder: str, key: Optional[str] = None
                         ) -> Optional[tuple[str, dict[str, Any], list[tuple[str, str]]]]:
    """(path, state, skipped) of the newest checkpoint in `folder` that can be read, else None.

    A numbered checkpoint that cannot be read (truncated, damaged) is skipped for the next older
    one; `skipped` lists (path, reason). A key that does not fit is not a damaged file: it raises,
    as does a folder where no checkpoint at all can be read.
    """
    from .encryption import KeyMismatch
    from ..errors import UsageError

    candidates = [ref.path for ref in reversed(list_checkpoints(folder))]
    latest = _join(folder, LATEST_NAME)
    if storage.exists(latest):
        candidates.append(latest)
    skipped: list[tuple[str, str]] = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, key), skipped
        except KeyMismatch:
            raise
        except UsageError as err:
            skipped.append((path, str(err)))
    if skipped:
        raise UsageError(f"no readable checkpoint in {folder} for auto_resume: {skipped[0][1]}"
                         + (f" (and {len(skipped) - 1} older)" if len(skipped) > 1 else "")
                         + "; remove the damaged files or set train.auto_resume: false")
    return None


def _publish_latest(path: str, latest: str) -> None:
    """Make `latest` a complete copy of `path` in one atomic rename (a hard link when the disk allows)."""
    if storage.is_remote(path):
        storage.copy(path, latest)  # server-side: the bytes never pass through this process
        return
    with atomic_path(latest) as tmp:
        os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:  # no hard links on this file system: copy the bytes instead
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                dst.write(src.read())


def save_checkpoint(state: dict[str, Any], folder: str, key: Optional[str] = None,
                    update_latest: bool = True) -> str:
    """Write `state` as `model_epoch_E_step_S.pth` in `folder`, then point `dd_model_latest.pth` at it."""
    path = _join(folder, checkpoint_name(int(state["epoch"]), int(state["step"])))
    save_object(state, path, key=key)
    if update_latest:
        _publish_latest(path, _join(folder, LATEST_NAME))
    return path


def load_checkpoint(path: str, key: Optional[str] = None) -> dict[str, Any]:
    return load_object(path, key=key)


def capture_rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from (Python, NumPy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # fewer GPUs now than when saved: keep the fresh states
            torch.cuda.set_rng_state_all(state["cuda"])


# Full (unsharded, unwrapped) state dicts through torch.distributed.checkpoint's API, so that a
# plain, DDP or FSDP2 model gives the same original parameter names and one optimizer format
# (keyed by parameter name); with FSDP2 these are collectives that every rank must call.
_FULL = {"full_state_dict": True, "cpu_offload": True}


def gather_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(**_FULL))


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))


def _load_full_model_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into a plain or FSDP2 (DTensor) model; every rank holds the whole checkpoint.

    Done here rather than by set_model_state_dict, which leaves the second name of a module
    registered twice (Deformable DETR's bbox_embed) undistributed.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    converted = {}
    for key, current in model.state_dict().items():
        value = full_state.get(key)
        if isinstance(current, DTensor) and value is not None:
            # src_data_rank=None: each rank shards its own copy, no communication.
            value = distribute_tensor(value.to(current.device, current.dtype), current.device_mesh,
                                      current.placements, src_data_rank=None)
        converted[key] = value if value is not None else current
    missing = sorted(set(model.state_dict()) - set(full_state))
    unexpected = sorted(set(full_state) - set(model.state_dict()))
    if missing or unexpected:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(converted, strict=True)


def load_model_and_optimizer(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                             model_state: dict[str, torch.Tensor], optimizer_state: Optional[dict]) -> None:
    """Load full state dicts (as `gather_*_state` wrote them) into a plain or FSDP2 model (not a DDP wrapper)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    _load_full_model_state(model, model_state)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
