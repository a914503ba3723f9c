"""Build the DeepSpeed engine from the two configs: our optimizer, LR scaling and schedule, compression."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..comm.protocol import CommunicatingOptimizer
from ..core import dist
from ..core.config import RunConfig
from ..optim import build_optimizer, build_scheduler, lr_scale, param_groups
from ..optim.schedule import StepPlan
from . import ds_config

log = logging.getLogger(__name__)


@dataclass
class BuiltEngine:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any  # what DeepSpeed wraps or uses as is
    scheduler: Any
    lr_scale: float
    # The optimizer that averages gradients over ranks itself (compressed), None when DeepSpeed does:
    # the runtime logs its comm_stats() and checkpoints its rank_local_state() through this.
    comm: CommunicatingOptimizer | None = None
    plan: StepPlan | None = None  # the optimizer steps the schedule was built for


def build_engine(cfg: RunConfig, settings: ds_config.EngineSettings, model: torch.nn.Module,
                 steps_per_epoch: int, *, replays: int = 1) -> BuiltEngine:
    """``steps_per_epoch``: loader batches per epoch on this rank; ``replays``: ``engine.step()`` calls per
    batch (``Objective.replays``). The schedule and the compression plan count optimizer steps (:class:`StepPlan`)."""
    import deepspeed

    plan = StepPlan(steps_per_epoch, cfg.train.epochs, replays=replays, grad_accum=settings.grad_accum)
    log.info("%d optimizer steps: %d epoch(s) x %d batch(es) x %d replay(s) / %d accumulation step(s)",
             plan.total, plan.epochs, plan.batches_per_epoch, plan.replays, plan.grad_accum)

    weight_decay = (settings.optimizer.get("params") or {}).get("weight_decay")
    scale = lr_scale(cfg.optim, settings.global_batch)
    optimizer = build_optimizer(settings.optimizer, param_groups(model, weight_decay), lr_scale=scale)
    gc = settings.gradient_compression
    if gc is not None:
        from ..comm.gradient import QuantizedAllReduceOptimizer

        optimizer = QuantizedAllReduceOptimizer(optimizer, bits=gc["bits"], block=gc["block"], seed=cfg.seed)
    comm = optimizer if settings.compresses or gc is not None else None
    if comm is not None and not isinstance(comm, CommunicatingOptimizer):
        raise TypeError(f"{type(comm).__name__} is registered as compressing but is not a CommunicatingOptimizer")
    scheduler = None
    if not settings.has_scheduler:  # on the object DeepSpeed steps (the wrapper, if any)
        scheduler = build_scheduler(optimizer, cfg.optim, plan.per_epoch, cfg.train.epochs)
    engine, ds_optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=settings.ds_config
    )
    if comm is None:
        return BuiltEngine(engine=engine, optimizer=ds_optimizer, scheduler=scheduler, lr_scale=scale, plan=plan)
    if engine.optimizer is not comm:
        # ds_config allows compression with ZeRO 0 and fp32 weights only, where DeepSpeed steps the client
        # optimizer itself; a DeepSpeed wrapper in between would bypass our all-reduce.
        raise RuntimeError(f"DeepSpeed wrapped {type(comm).__name__} in {type(engine.optimizer).__name__}; "
                           "compressed communication needs ZeRO stage 0 with fp32 weights")
    # The optimizer communicates (compressed) itself: DeepSpeed must not also all-reduce gradients.
    engine.enable_backward_allreduce = False
    world = dist.world_size()
    if world > 1:  # at world size 1 compression is skipped, and check_compression_plan says so, once
        if gc is not None:
            log.info("gradient_compression %s: %d-bit quantized gradient all-reduce replaces DeepSpeed's",
                     gc["type"], gc["bits"])
        else:
            log.info("%s does its own compressed communication; DeepSpeed's gradient all-reduce is off",
                     settings.optimizer["type"])
    from ..optim.onebit import check_compression_plan

    check_compression_plan(comm, plan.total, world)
    return BuiltEngine(engine=engine, optimizer=ds_optimizer, scheduler=scheduler, lr_scale=scale, comm=comm,
                       plan=plan)
