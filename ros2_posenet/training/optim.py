"""Optimiser and learning-rate schedule: Adam with parameter groups, constant or cosine per step."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..losses import parameter_groups
from ..model import PoseNet


def position_lr_scale(cfg: dict, train_t: torch.Tensor) -> float:
    """``optim.position_lr_scale``, with ``auto`` = RMS distance of training positions from their mean (>= 1)."""
    value = cfg["optim"]["position_lr_scale"]
    if value != "auto":
        return float(value)
    spread = (train_t.double() - train_t.double().mean(0)).pow(2).sum(-1).mean().sqrt().item()
    return max(1.0, spread)


def build_optimizer(model: PoseNet, criterion: nn.Module, cfg: dict, lr: float, position_scale: float = 1.0) -> torch.optim.Optimizer:
    """Adam, as in the paper; no weight decay on ŝx, ŝq, which may have their own ``optim.loss_lr``.

    Groups: backbone+head, position layer (lr × ``position_scale``), loss parameters.
    """
    groups = parameter_groups(model, criterion, cfg["optim"]["weight_decay"])
    position_params = {id(p) for p in model.fc_position.parameters()}
    groups[0]["params"] = [p for p in groups[0]["params"] if id(p) not in position_params]
    groups.insert(1, {"params": list(model.fc_position.parameters()), "weight_decay": cfg["optim"]["weight_decay"], "lr": lr * position_scale})
    if len(groups) > 2 and cfg["optim"]["loss_lr"] is not None:
        groups[2]["lr"] = float(cfg["optim"]["loss_lr"])
    return torch.optim.Adam(groups, lr=lr, eps=cfg["optim"]["eps"])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: 1 (constant) or cosine from 1 to ``final_lr_fraction``."""
    final = float(cfg["optim"]["final_lr_fraction"])
    if cfg["optim"]["schedule"] == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
    )

