"""``train_one_epoch``: the adversarial training loop. It never changes when an objective is added.

Per batch: ``out = objective(ctx, x, y)`` -> ``engine.backward(out.loss)`` ->
``objective.after_backward()`` -> ``engine.step()``.

The hot path stays asynchronous on an accelerator. Under ``train.nan_policy=abort`` (the default) a
step makes no host sync and no collective: the loss and correct-prediction sums stay in device
tensors, and "was this step's loss or gradient non-finite" is folded into a device scalar holding the
first such global step (:class:`NonFiniteWatch`). Every ``train.log_every`` steps, and at the end of
the epoch, the sums and that scalar are reduced over ranks with one host transfer; a flagged step
raises ``NonFiniteLossError`` naming it. The trainer checks the watch before every checkpoint save,
so although the steps after a bad one still run (on non-finite weights), nothing is written from
them: the last checkpoint is the last good state.

Under ``train.nan_policy=skip`` every rank must agree, within the step, whether to take it: each step
then costs one all-reduce of the (loss, gradient) flags and one host sync.

fp16 weights (DeepSpeed's ``"fp16"`` section): dynamic loss scaling makes inf gradients on purpose, and
DeepSpeed's optimizer detects them (agreed over ranks), skips the step and lowers the scale. Those
gradients are its business, not divergence: the watch then checks the loss only, every step goes to
``engine.step()``, and a step DeepSpeed skipped is counted (``TrainState.overflow_steps``) and logged with
the new scale (DeepSpeed's own check already synced the host, so reading it costs nothing). Gradients that
overflow at the minimum scale are divergence: ``NonFiniteLossError``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core import dist
from ..core.errors import NonFiniteLossError
from ..objectives import ObjectiveOutput
from . import ds_adapter

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of this epoch already trained
    global_step: int = 0  # batches trained in total
    skipped_steps: int = 0  # non-finite steps skipped under nan_policy=skip
    overflow_steps: int = 0  # fp16: steps DeepSpeed's loss scaling skipped (gradient overflow)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch

    def to_dict(self) -> dict[str, Any]:
        return dict(epoch=self.epoch, step_in_epoch=self.step_in_epoch, global_step=self.global_step,
                    skipped_steps=self.skipped_steps, overflow_steps=self.overflow_steps, history=self.history)


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce of a device tensor; asynchronous on NCCL (the caller's host read is the sync)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t, op=op if op is not None else tdist.ReduceOp.SUM)
    return t


class NonFiniteWatch:
    """The first global step (1-based) at which this rank saw a non-finite loss or gradient, on the device.

    Stored as ``2 * step`` for a loss and ``2 * step + 1`` for a gradient (a loss is reported first when
    both went bad in one step); ``inf`` while every step was finite. :meth:`check` is collective.
    """

    def __init__(self, device: torch.device):
        self.first = torch.full((), math.inf, dtype=torch.float64, device=device)
        self.pending = False  # something was recorded since the last check

    def record(self, loss_bad: torch.Tensor, grad_bad: torch.Tensor, step: int) -> None:
        code = (~loss_bad).to(torch.float64) + 2.0 * step  # float64: exact for any realistic step count
        self.first = torch.minimum(self.first, torch.where(loss_bad | grad_bad, code, math.inf))
        self.pending = True

    def check(self, state: TrainState) -> None:
        """Raise ``NonFiniteLossError`` if any rank saw a non-finite step (one all-reduce, one host sync)."""
        if self.pending:
            self.raise_if_bad(_all_reduce(self.first.clone(), _min_op()).item(), state)

    def raise_if_bad(self, first: float, state: TrainState) -> None:
        """``first``: the rank-reduced minimum of :attr:`first`; ``state``: where training is now."""
        self.pending = False
        if math.isinf(first):
            return
        step, what = int(first) // 2, ("loss", "gradient")[int(first) % 2]
        # Every check happens within the epoch of the bad step (the epoch's end checks too).
        in_epoch = state.step_in_epoch - (state.global_step - step)
        raise NonFiniteLossError(
            f"non-finite {what} at epoch {state.epoch + 1} step {in_epoch} (global step {step}); the last "
            "checkpoint is the last good state. Lower the LR, or set train.nan_policy=skip to skip such steps"
        )


def _min_op():
    import torch.distributed as tdist

    return tdist.ReduceOp.MIN


class DeviceMeter:
    """This rank's sums over a window of steps: loss x examples and correct predictions on the device,
    example counts on the host, each objective metric on the device. Nothing here waits for the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.count = 0  # examples the loss sum covers (each replay counts)
        self.samples = 0  # batch examples (a replayed batch counts once)
        self.steps = 0  # batches
        self.metric_sums: dict[str, torch.Tensor] = {}
        self.metric_counts: dict[str, int] = {}

    def update(self, out: ObjectiveOutput, y: torch.Tensor, n: int) -> None:
        loss = out.loss.detach().to(torch.float64) * n
        if out.logits is not None:
            targets = out.targets if out.targets is not None else y
            correct = (out.logits.detach().argmax(1) == targets).sum().to(torch.float64)
            self.sums += torch.stack([loss, correct])
        else:
            self.sums[0] += loss
        self.count += n
        for k, v in out.metrics.items():
            v = v.detach().to(torch.float64)
            self.metric_sums[k] = self.metric_sums[k] + v if k in self.metric_sums else v
            self.metric_counts[k] = self.metric_counts.get(k, 0) + 1

    def reduce(self, watch: NonFiniteWatch, state: TrainState) -> dict[str, Any]:
        """Sums over all ranks (two collectives, one host sync); raises first if a step was non-finite."""
        keys = sorted(self.metric_sums)
        counts = torch.tensor([self.count, self.samples], dtype=torch.float64, device=self.device)
        payload = torch.cat([self.sums, counts, *(self.metric_sums[k].view(1) for k in keys)])
        _all_reduce(payload)
        first = _all_reduce(watch.first.clone(), _min_op())
        values = torch.cat([payload, first.view(1)]).tolist()
        watch.raise_if_bad(values[-1], state)
        loss_sum, correct, count, samples = values[:4]
        world = dist.world_size()
        return {"loss_sum": loss_sum, "correct": correct, "count": count, "samples": samples,
                "metrics": {k: v / (self.metric_counts[k] * world) for k, v in zip(keys, values[4:-1])}}


def _local_grads(engine) -> list[torch.Tensor]:
    """This rank's gradients: ``.grad`` of the module (ZeRO-0) plus ZeRO-1/2's reduced partitions."""
    return [p.grad for p in engine.module.parameters() if p.grad is not None] + \
        ds_adapter.gradient_partitions(engine.optimizer)


def _grads_non_finite(engine, device: torch.device) -> torch.Tensor:
    """Device bool: is any of this rank's gradients non-finite? One fused max-|g| per dtype, no host sync."""
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for g in _local_grads(engine):
        if g.numel():
            by_dtype.setdefault((g.dtype, g.device), []).append(g)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for grads in by_dtype.values():
        # max |g| is inf or nan exactly when some element is (a sum of squares could overflow instead)
        bad = bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads, math.inf))).all().to(device)
    return bad


def _drop_grads(engine) -> None:
    """Forget this step's gradients without an optimizer step (the optimizer state is untouched)."""
    engine.zero_grad()
    zero = getattr(engine.optimizer, "zero_grad", None)
    if callable(zero):
        zero()


def _skip_non_finite(loss_bad: torch.Tensor, grad_bad: torch.Tensor, state: TrainState, engine) -> bool:
    """nan_policy=skip: the step is dropped on every rank if any rank saw a non-finite loss or gradient.

    The per-step decision costs one all-reduce and one host sync (every rank must take the same one).
    """
    flags = _all_reduce(torch.stack([loss_bad, grad_bad]).to(torch.float64))
    loss_n, grad_n = flags.tolist()
    if not (loss_n or grad_n):
        return False
    _drop_grads(engine)
    state.skipped_steps += 1
    log.warning("skipping step %d: non-finite %s (%d skipped so far)", state.global_step + 1,
                "loss" if loss_n else "gradient", state.skipped_steps)
    return True


def _fp16_step(engine, state: TrainState, floor: float | None) -> None:
    """``engine.step()`` under fp16 loss scaling: count and log a step DeepSpeed skipped for overflow; an overflow
    at the dynamic scale's floor is divergence (ZeRO's scaler raises there; the ZeRO-0 one would skip forever)."""
    boundary = engine.is_gradient_accumulation_boundary()  # before step(), which advances the micro-step count
    scale = ds_adapter.loss_scale(engine)
    diverged = NonFiniteLossError(
        f"fp16 gradients overflow even at the minimum loss scale ({scale:g}) at global step {state.global_step + 1}: "
        "training diverged; lower the LR, or use bf16 where the accelerator has it")
    try:
        engine.step()
    except Exception as e:  # DeepSpeed's DynamicLossScaler raises a bare Exception at its minimum scale
        if "loss scale already at minimum" not in str(e):
            raise
        raise diverged from e
    if boundary and not engine.was_step_applied():
        if floor is not None and scale <= floor:
            raise diverged
        state.overflow_steps += 1
        log.info("fp16: step %d overflowed and DeepSpeed skipped it; loss scale now %g (%d overflow "
                 "step(s) so far)", state.global_step + 1, ds_adapter.loss_scale(engine), state.overflow_steps)


def train_one_epoch(engine, objective, ctx, loader, state: TrainState, *, cfg, metrics=None,
                    on_step: Callable[[TrainState], None] | None = None, progress=None, comm=None,
                    watch: NonFiniteWatch | None = None, max_steps: int | None = None) -> dict[str, float]:
    """Train one (possibly resumed) epoch; returns rank-reduced loss/accuracy and timing.

    ``metrics(record)`` gets a step record every ``train.log_every`` steps; ``on_step(state)`` runs after
    every step; ``progress(n)`` advances a progress bar; ``comm`` (``BuiltEngine.comm``) adds its
    ``comm_stats()`` to the step records; ``watch`` is the caller's :class:`NonFiniteWatch` (the trainer
    checks it before saving), a private one if None.
    """
    device = dist.device()
    watch = watch if watch is not None else NonFiniteWatch(device)
    skip = cfg.train.nan_policy == "skip"
    fp16 = engine.fp16_enabled()  # DeepSpeed's loss scaling owns non-finite gradients (module docstring)
    floor = ds_adapter.min_loss_scale(engine) if fp16 else None
    finite = torch.zeros((), dtype=torch.bool, device=device)
    window = DeviceMeter(device)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "samples": 0.0}
    t_start = t_window = time.perf_counter()
    max_steps = cfg.train.max_steps_per_epoch if max_steps is None else max_steps  # the trainer's whole optimizer steps
    engine.train()

    def flush() -> dict[str, Any]:
        stats = window.reduce(watch, state)
        for k in totals:
            totals[k] += stats[k]
        return stats

    for batch in loader:  # (x, y), or (x, y, example ids) when the loader gives them (attack.reuse)
        if max_steps is not None and state.step_in_epoch >= max_steps:
            break
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True)
        ctx.index = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
        if cfg.model.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for _ in range(objective.replays):
            ctx.step = state.global_step
            out = objective(ctx, x, y)
            engine.backward(out.loss)
            loss_bad = ~torch.isfinite(out.loss.detach())
            grad_bad = finite if fp16 else _grads_non_finite(engine, device)  # e.g. inf gradients, finite loss
            if skip:
                if _skip_non_finite(loss_bad, grad_bad, state, engine):
                    continue
            else:
                watch.record(loss_bad, grad_bad, state.global_step + 1)
            objective.after_backward()
            if fp16:
                _fp16_step(engine, state, floor)
            else:
                engine.step()
            window.update(out, y, x.shape[0])
        window.samples += x.shape[0]
        window.steps += 1
        state.step_in_epoch += 1
        state.global_step += 1
        if progress is not None:
            progress(x.shape[0] * dist.world_size())
        if state.global_step % cfg.train.log_every == 0:
            stats = flush()
            now = time.perf_counter()
            count = max(stats["count"], 1.0)
            record = {"kind": "step", "epoch": state.epoch + 1, "step": state.global_step,  # 1-based, as epoch rows
                      "loss": stats["loss_sum"] / count, "train_acc": stats["correct"] / count,
                      "lr": engine.get_lr()[0], "samples_per_s": stats["count"] / max(now - t_window, 1e-9),
                      "skipped_steps": state.skipped_steps, **stats["metrics"]}
            if fp16:
                record.update(overflow_steps=state.overflow_steps, loss_scale=ds_adapter.loss_scale(engine))
            if comm is not None:  # BuiltEngine.comm: the compressing optimizer reports bytes sent and its stage
                record.update({f"comm_{k}": v for k, v in comm.comm_stats().items()})
            if metrics is not None:
                metrics(record)
            window, t_window = DeviceMeter(device), now
        if on_step is not None:
            on_step(state)
    if window.steps or watch.pending:
        flush()
    elapsed = time.perf_counter() - t_start
    count = max(totals["count"], 1.0)
    return {"train_loss": totals["loss_sum"] / count, "train_acc": totals["correct"] / count,
            "train_seconds": elapsed, "samples_per_s": totals["samples"] / max(elapsed, 1e-9)}
