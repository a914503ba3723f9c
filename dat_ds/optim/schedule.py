"""LR scaling with batch size, linear warmup, and MultiStep/cosine/one-cycle schedules as one LambdaLR.

The base LR comes from the DeepSpeed JSON; ``optim.lr_scaling`` scales it by the global batch over
``optim.base_batch_size`` (linear: Goyal et al.; sqrt: for adaptive optimizers such as LAMB).

Epoch-based settings (``warmup_epochs``, ``milestones``, the cosine span) are converted to optimizer
steps through :class:`StepPlan`, the one place that says how many optimizer steps an epoch has.

``onecycle`` is the cyclic schedule of fast adversarial training (Smith & Topin 2019, as used by Wong,
Rice & Kolter 2020): the LR rises linearly from 0 to the JSON lr at ``optim.onecycle_peak`` of the run
(their 2/5) and falls linearly back to 0 at its last optimizer step. Short runs need it: it spends the
budget at a large LR and still ends converged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.config import OptimConfig


def lr_scale(cfg: OptimConfig, global_batch: int) -> float:
    ratio = global_batch / cfg.base_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def accumulation_unit(grad_accum: int, replays: int = 1) -> int:
    """Batches from one accumulation boundary to the next: checkpoints and epoch ends must fall on one.

    DeepSpeed saves neither a half-summed gradient nor its micro-step count, so a checkpoint between two
    optimizer steps resumes with the partial sum lost and the boundaries shifted."""
    return grad_accum // math.gcd(grad_accum, replays)


@dataclass(frozen=True)
class StepPlan:
    """How many OPTIMIZER steps a run takes: what LR schedules, warm-up and compression plans count.

    The loop calls ``engine.step()`` once per replay of each batch (Free-AT replays every batch m times),
    and DeepSpeed steps the optimizer and its LR scheduler once every ``grad_accum`` of those calls. An
    epoch of ``batches`` therefore has ``batches * replays / grad_accum`` optimizer steps; counting batches
    instead made Free-AT's schedule run m times too fast.
    """

    batches_per_epoch: int  # loader (micro-)batches per epoch on one rank
    epochs: int
    replays: int = 1  # engine.step() calls per batch: ``Objective.replays``
    grad_accum: int = 1  # engine.step() calls per optimizer step: DeepSpeed's gradient_accumulation_steps

    def __post_init__(self):
        for name in ("batches_per_epoch", "replays", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"StepPlan.{name}={getattr(self, name)} must be >= 1")

    @property
    def per_epoch(self) -> float:
        """Optimizer steps per epoch (fractional when grad_accum does not divide the epoch's engine steps)."""
        return self.batches_per_epoch * self.replays / self.grad_accum

    @property
    def total(self) -> int:
        """Optimizer steps of the whole run (DeepSpeed's accumulation boundary runs across epochs)."""
        return self.batches_per_epoch * self.replays * self.epochs // self.grad_accum


def lr_multiplier(cfg: OptimConfig, step: int, steps_per_epoch: float, total_epochs: int) -> float:
    """The LR factor after ``step`` optimizer steps; ``steps_per_epoch``: :attr:`StepPlan.per_epoch`."""
    epoch = step / steps_per_epoch  # fractional epoch at this optimizer step
    if cfg.schedule == "onecycle":
        return onecycle_multiplier(step, steps_per_epoch * total_epochs, cfg.onecycle_peak)
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


def onecycle_multiplier(step: int, total_steps: float, peak: float) -> float:
    """The one-cycle factor for optimizer step ``step`` (0-based) of ``total_steps``.

    As in Wong et al.'s code the LR of a step is the schedule at the END of it, ``(step + 1) / total``:
    the first step already moves the weights and the last one lands on LR 0.
    """
    progress = min(1.0, (step + 1) / max(total_steps, 1e-12))
    if progress <= peak:
        return progress / peak
    return max(0.0, (1.0 - progress) / (1.0 - peak))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: float,
                    total_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``steps_per_epoch``: optimizer steps per epoch (:attr:`StepPlan.per_epoch`), not batches."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(cfg, step, steps_per_epoch, total_epochs)
    )
