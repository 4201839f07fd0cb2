"""Weights & Biases logging of training (the spec's top-level `wandb` section, TAO's), on rank 0.

TAO logs to W&B only when it is logged in and otherwise goes on without it; here a run that cannot
reach W&B logs offline instead (WANDB_MODE=offline: the run is written under the train results
folder, `wandb sync` uploads it later), so a training job on a cluster without internet access
keeps its W&B record. The mode is online when an API key is known (WANDB_API_KEY, or `wandb login`'s
netrc entry for the W&B host) and that host answers; a WANDB_MODE the user set wins. One log line
says which mode and why. The `wandb` package is an optional extra (`pip install './trainer[wandb]'`):
without it, enabling the section is one warning line and training goes on.

Logged: the effective spec as the run's config (never the key, also masked in the command line W&B
records), the same scalars as TensorBoard's event files (runtime/scalars.py: per step the loss, its
terms, the learning rate, throughput and data wait, per validation the COCO metrics), at the end the
run's final state.
"""
from __future__ import annotations

import dataclasses
import netrc
import os
import socket
import sys
import tempfile
from typing import Any, Optional
from urllib.parse import urlparse

from .logging import get_logger
from .scalars import step_scalars, validation_scalars

log = get_logger("wandb")
REACH_TIMEOUT_S = 3.0  # how long the W&B host may take to accept a connection before we log offline


def _offline_reason(base_url: str) -> Optional[str]:
    """Why this process cannot log to `base_url` online (None: it can)."""
    host = urlparse(base_url).hostname or base_url
    port = urlparse(base_url).port or (443 if base_url.startswith("https") else 80)
    if not os.environ.get("WANDB_API_KEY"):
        try:
            logged_in = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one wandb cannot use either
            logged_in = False
        if not logged_in:
            return f"no API key (WANDB_API_KEY, or `wandb login` for {host})"
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        return f"{base_url} is not reachable ({err.__class__.__name__}: {err})"
    return None


class WandbRun:
    """One W&B run of a training launch; what the train outputs report goes here too."""

    def __init__(self, run) -> None:
        self.run = run

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_step(self, step: int, epoch: int, losses: dict[str, float], lr: float, **extra: float) -> None:
        self.run.log(step_scalars(losses, lr, epoch, **extra), step=step)

    def log_validation(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(validation_scalars(metrics), step=step)

    def finish(self, state: str) -> None:
        import wandb

        self.run.summary["state"] = state
        self.run.finish(exit_code=0 if state == "completed" else 1)
        # finish() can return before W&B's service has written the run's file; its teardown waits for it.
        wandb.teardown()


def open_run(spec, folder: Optional[str]) -> Optional[WandbRun]:
    """The W&B run of this training launch when `wandb.enable` is set (rank 0 calls it), else None.
    `folder` is the local train results folder: the run's files go under `{folder}/wandb`. None (an
    s3:// results folder): under WANDB_DIR, else the temporary folder."""
    settings = spec.wandb
    if not settings.enable:
        return None
    mode = os.environ.get("WANDB_MODE")
    if mode == "disabled":
        log.info("wandb.enable: WANDB_MODE=disabled is set: not logging to Weights & Biases")
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb.enable: the wandb package is not installed (pip install './trainer[wandb]'); "
                    "training goes on without Weights & Biases logging")
        return None
    base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url  # a self-hosted server, or W&B's
    if mode:
        why = f"WANDB_MODE={mode} is set"
    else:
        reason = _offline_reason(base_url)
        mode, why = ("offline", f"WANDB_MODE=offline: {reason}") if reason else ("online", f"logged in to {base_url}")
    config = dataclasses.asdict(dataclasses.replace(spec, encryption_key=None))
    argv = sys.argv
    if spec.encryption_key:  # W&B records the command line, where -k gave the key
        sys.argv = [arg.replace(spec.encryption_key, "***") for arg in argv]
    try:
        run = wandb.init(project=settings.project, entity=settings.entity or None, group=settings.group or None,
                         tags=list(settings.tags), name=settings.name or None, id=settings.run_id or None,
                         resume="allow" if settings.run_id else None,
                         reinit="create_new" if settings.reinit else None,  # TAO's bool: several runs a process
                         save_code=settings.save_code, sync_tensorboard=settings.sync_tensorboard, config=config,
                         dir=folder or os.environ.get("WANDB_DIR") or tempfile.gettempdir(), mode=mode,
                         settings=wandb.Settings(silent=True, console="off", disable_git=True))
    finally:
        sys.argv = argv
    where = f"upload it later with `wandb sync {os.path.dirname(run.dir)}`" if mode == "offline" else (run.url or "")
    log.info("wandb.enable: logging to Weights & Biases %s (%s), project %s, run %s: %s", mode, why,
             settings.project, run.id, where)
    return WandbRun(run)
