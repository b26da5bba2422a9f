"""Optimisers and learning-rate schedules as pure functions of the step (nothing to save on resume)."""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from robustkd.config import OptimConfig


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def learning_rate(cfg: OptimConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate at optimisation ``step`` (0-based): linear warm-up, then the schedule."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return cfg.lr * (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        # Milestones are compared with completed epochs, so a decay at 100 starts with epoch index 100.
        return cfg.lr * cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), math.floor(epoch + 1e-9))
    total = epochs * steps_per_epoch
    start = cfg.warmup_epochs * steps_per_epoch
    t = (step - start) / max(1.0, total - start)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, t)))
