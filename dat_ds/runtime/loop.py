"""``train_one_epoch``: the adversarial training loop. It never changes when an objective is added.

Per batch: ``out = objective(ctx, x, y)`` -> ``engine.backward(out["loss"])`` -> optional
``out["after_backward"]()`` -> ``engine.step()``. Metrics are summed over ranks before they are logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core import dist
from ..core.errors import NonFiniteLossError

log = logging.getLogger(__name__)


class StopTraining(Exception):
    """Raised by a callback (e.g. the catastrophic-overfitting monitor) to end training cleanly."""


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of this epoch already trained
    global_step: int = 0  # batches trained in total
    skipped_steps: int = 0  # non-finite steps skipped under nan_policy=skip
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch

    def to_dict(self) -> dict[str, Any]:
        return dict(epoch=self.epoch, step_in_epoch=self.step_in_epoch, global_step=self.global_step,
                    skipped_steps=self.skipped_steps, history=self.history)


class Meter:
    """Sums of (loss, correct, count) on this rank; ``reduce()`` sums them over all ranks."""

    def __init__(self):
        self.loss_sum = 0.0
        self.correct = 0.0
        self.count = 0.0

    def update(self, loss: float, correct: float, count: int) -> None:
        self.loss_sum += loss * count
        self.correct += correct
        self.count += count

    def reduce(self) -> dict[str, float]:
        t = dist.all_reduce_sum(torch.tensor([self.loss_sum, self.correct, self.count], dtype=torch.float64))
        n = max(t[2].item(), 1.0)
        return {"loss": t[0].item() / n, "acc": t[1].item() / n, "count": int(t[2].item())}


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], dtype=torch.float64)
    return dist.all_reduce_sum(flag).item() == 0


def _local_grads(engine) -> list[torch.Tensor]:
    """This rank's gradients: ``.grad`` of the module (ZeRO-0) plus ZeRO-1/2's reduced partitions."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    partitions = getattr(engine.optimizer, "averaged_gradients", None)
    if isinstance(partitions, dict):
        for group in partitions.values():
            grads.extend(g for g in (group or []) if isinstance(g, torch.Tensor))
    return grads


def _grads_finite(engine) -> bool:
    """True when every rank's gradients are finite (all ranks get the same answer: one all-reduce)."""
    grads = _local_grads(engine)
    bad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    flag = torch.tensor([1.0 if bad else 0.0], dtype=torch.float64)
    return dist.all_reduce_sum(flag).item() == 0


def _drop_grads(engine) -> None:
    """Forget this step's gradients without an optimizer step (the optimizer state is untouched)."""
    engine.zero_grad()
    zero = getattr(engine.optimizer, "zero_grad", None)
    if callable(zero):
        zero()


def _non_finite(state: TrainState, what: str, policy: str) -> None:
    """Apply ``train.nan_policy`` to a non-finite loss or gradient seen in this step."""
    if policy == "abort":
        raise NonFiniteLossError(
            f"non-finite {what} at epoch {state.epoch + 1} step {state.step_in_epoch + 1} (global step "
            f"{state.global_step + 1}); the last checkpoint is the last good state. Lower the LR, or set "
            "train.nan_policy=skip to skip such steps"
        )
    state.skipped_steps += 1
    log.warning("skipping step %d: non-finite %s (%d skipped so far)", state.global_step + 1, what,
                state.skipped_steps)


def train_one_epoch(engine, objective, ctx, loader, state: TrainState, *, cfg, metrics=None,
                    on_step: Callable[[TrainState], None] | None = None, progress=None) -> dict[str, float]:
    """Train one (possibly resumed) epoch; returns rank-reduced loss/accuracy and timing."""
    device = dist.device()
    meter, window = Meter(), Meter()
    t_start = t_window = time.perf_counter()
    samples = 0
    max_steps = cfg.train.max_steps_per_epoch
    engine.train()
    for x, y in loader:
        if max_steps is not None and state.step_in_epoch >= max_steps:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if cfg.model.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for _ in range(objective.replays):
            ctx.step = state.global_step
            out = objective(ctx, x, y)
            loss = out["loss"]
            if not _all_finite(loss):
                _non_finite(state, "loss", cfg.train.nan_policy)
                continue
            engine.backward(loss)
            if "after_backward" in out:
                out["after_backward"]()
            if not _grads_finite(engine):  # e.g. inf gradients from a finite loss
                _non_finite(state, "gradient", cfg.train.nan_policy)
                _drop_grads(engine)
                continue
            engine.step()
            logits = out.get("logits")
            correct = float((logits.argmax(1) == out.get("targets", y)).sum()) if logits is not None else 0.0
            meter.update(float(loss.detach()), correct, x.shape[0])
            window.update(float(loss.detach()), correct, x.shape[0])
        samples += x.shape[0]
        state.step_in_epoch += 1
        state.global_step += 1
        if progress is not None:
            progress(x.shape[0] * dist.world_size())
        if state.global_step % cfg.train.log_every == 0:
            stats = window.reduce()
            now = time.perf_counter()
            record = {"kind": "step", "epoch": state.epoch, "step": state.global_step, "loss": stats["loss"],
                      "train_acc": stats["acc"], "lr": engine.get_lr()[0],
                      "samples_per_s": stats["count"] / max(now - t_window, 1e-9), "skipped_steps": state.skipped_steps}
            record.update({k: float(v) for k, v in out.items() if k.startswith("metric_")})
            comm_stats = getattr(engine.optimizer, "comm_stats", None)
            if callable(comm_stats):  # compressing optimizers report bytes sent and their stage
                record.update({f"comm_{k}": v for k, v in comm_stats().items()})
            if metrics is not None:
                metrics(record)
            window, t_window = Meter(), now
        if on_step is not None:
            on_step(state)
    stats = meter.reduce()
    elapsed = time.perf_counter() - t_start
    return {"train_loss": stats["loss"], "train_acc": stats["acc"], "train_seconds": elapsed,
            "samples_per_s": dist.all_reduce_sum(torch.tensor([samples], dtype=torch.float64)).item() / max(elapsed, 1e-9)}
