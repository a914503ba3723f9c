"""LR scaling with batch size, linear warmup, and MultiStep/cosine decay as one LambdaLR.

The base LR comes from the DeepSpeed JSON; ``optim.lr_scaling`` scales it by the global batch over
``optim.base_batch_size`` (linear: Goyal et al.; sqrt: for adaptive optimizers such as LAMB).
"""

from __future__ import annotations

import math

import torch

from ..core.config import OptimConfig


def lr_scale(cfg: OptimConfig, global_batch: int) -> float:
    ratio = global_batch / cfg.base_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def lr_multiplier(cfg: OptimConfig, step: int, steps_per_epoch: int, total_epochs: int) -> float:
    epoch = step / max(1, steps_per_epoch)  # fractional epoch at this optimizer step
    warmup = cfg.warmup_epochs
    if warmup > 0 and epoch < warmup:
        return (step + 1) / (warmup * steps_per_epoch)
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        span = max(1e-12, total_epochs - warmup)
        progress = min(1.0, (epoch - warmup) / span)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    total_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(cfg, step, steps_per_epoch, total_epochs)
    )
