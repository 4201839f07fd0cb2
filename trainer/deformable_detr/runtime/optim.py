"""How the trainable parameters learn: Deformable DETR's three parameter groups, optimizer, lr schedule.

Which parameters train (`train.freeze`, `model.train_backbone`) is decided by `build_model`;
frozen parameters are simply left out of every group here."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config.schema import ExperimentConfig, OptimConfig
from ..errors import UsageError
from .logging import get_logger

log = get_logger("optim")


def param_groups(model: nn.Module, optim: OptimConfig, backbone_names: Sequence[str],
                 linear_proj_names: Sequence[str]) -> list[dict]:
    """Trainable parameters in three groups: backbone (lr_backbone), linear projections
    (lr * lr_linear_proj_mult) and the rest (lr). Empty groups are left out."""
    backbone, linear_proj, rest = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(part in name for part in backbone_names):
            backbone.append(param)
        elif any(part in name for part in linear_proj_names):
            linear_proj.append(param)
        else:
            rest.append(param)
    groups = [
        {"params": rest, "lr": optim.lr, "name": "rest"},
        {"params": backbone, "lr": optim.lr_backbone, "name": "backbone"},
        {"params": linear_proj, "lr": optim.lr * optim.lr_linear_proj_mult, "name": "linear_proj"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, spec: ExperimentConfig) -> torch.optim.Optimizer:
    optim = spec.train.optim
    groups = param_groups(model, optim, spec.model.backbone_names, spec.model.linear_proj_names)
    if not groups:
        raise UsageError("train.freeze / model.train_backbone: every parameter is frozen; nothing to train")
    if optim.optimizer == "SGD":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


# TAO's AutoReduce: a value less than 0.1 % below the best one so far is no improvement.
PLATEAU_THRESHOLD = 1e-3


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig):
    """The per-epoch schedule: MultiStep at `lr_steps`, StepLR every `lr_step_size` epochs, or
    AutoReduce (ReduceLROnPlateau on `lr_monitor`, stepped with that value: see `monitors_a_value`)."""
    if optim.lr_scheduler == "AutoReduce":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=optim.lr_decay, patience=optim.patience,
            threshold=PLATEAU_THRESHOLD, threshold_mode="rel")
    if optim.lr_scheduler == "StepLR":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.lr_step_size, gamma=optim.lr_decay)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=sorted(optim.lr_steps), gamma=optim.lr_decay)


def monitors_a_value(scheduler) -> bool:
    """True for a schedule stepped with the monitored value (AutoReduce), False for one stepped per epoch."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
