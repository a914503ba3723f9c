"""Build the DeepSpeed engine from the two configs: our optimizer, LR scaling and schedule, compression."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..core.config import RunConfig
from ..optim import build_optimizer, build_scheduler, lr_scale, param_groups
from . import ds_config

log = logging.getLogger(__name__)


@dataclass
class BuiltEngine:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any  # what DeepSpeed wraps or uses as is
    scheduler: Any
    lr_scale: float
    comm: Any = None  # CommunicatingOptimizer | None: whatever does compressed communication, if anything


def build_engine(cfg: RunConfig, settings: ds_config.EngineSettings, model: torch.nn.Module, steps_per_epoch: int):
    import deepspeed

    weight_decay = (settings.optimizer.get("params") or {}).get("weight_decay")
    scale = lr_scale(cfg.optim, settings.global_batch)
    optimizer = build_optimizer(settings.optimizer, param_groups(model, weight_decay), lr_scale=scale)
    if settings.gradient_compression is not None:
        from ..comm import QuantizedGradientAllReduce

        gc = settings.gradient_compression
        QuantizedGradientAllReduce(bits=gc["bits"], block=gc["block"], seed=cfg.seed).attach(optimizer)
    scheduler = None
    if not settings.has_scheduler:
        scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=settings.ds_config
    )
    if settings.compresses:
        # The optimizer communicates (compressed) itself: DeepSpeed must not also all-reduce gradients.
        engine.enable_backward_allreduce = False
        log.info("%s does its own compressed communication; DeepSpeed's gradient all-reduce is off",
                 settings.optimizer["type"])
    elif settings.gradient_compression is not None:
        engine.enable_backward_allreduce = False  # the quantized all-reduce in the optimizer's step pre-hook replaces it
        log.info("gradient_compression %s: %d-bit quantized gradient all-reduce replaces DeepSpeed's",
                 settings.gradient_compression["type"], settings.gradient_compression["bits"])
    return BuiltEngine(engine=engine, optimizer=optimizer, scheduler=scheduler, lr_scale=scale)
