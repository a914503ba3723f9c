"""Weight EMA: an exponential moving average of the parameters, kept next to the raw weights.

Every ``ema.every`` optimizer steps (DeepSpeed's ``engine.global_steps``: gradient accumulation and
Free-AT's replays counted as DeepSpeed counts them) the average moves towards the parameters::

    ema = d * ema + (1 - d) * param,   d = min(decay, (1 + t) / (10 + t)) with ema.warmup, else decay

where ``t`` is the number of EMA updates so far (TensorFlow's ``ExponentialMovingAverage(num_updates)``
and DM-Improves-AT's dynamic decay): early averages are not dominated by the random initialisation.
Buffers (BatchNorm ``running_mean``/``running_var``/``num_batches_tracked``, the normalisation
constants) are copied, not averaged: an averaged BatchNorm statistic would not describe the averaged
weights any better, and the references copy them.

Where the average lives: in fp32 on the parameters' device. Under ZeRO 0/1/2 every rank holds the full
parameters and so a full copy of the average (identical on every rank; rank 0 saves it in the
checkpoint's client state). Under ZeRO-3 each rank holds its own partition of every parameter
(``param.ds_tensor``, a flat slice of ``ceil(numel / world)`` elements) and averages just that, so the
average is sharded exactly like the parameters; it is saved per rank and put together only to export
(``dat_ds.evaluation.loading``). ``applied(model)`` swaps the average in for evaluation and puts the
raw weights back bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..core.config import EMAConfig
from .callbacks import Callback, TrainerView

if TYPE_CHECKING:
    from .loop import TrainState

log = logging.getLogger(__name__)
STATE_KEY = "ema"  # in the checkpoint: client state (full copy) or rank_state_<r>.pt (ZeRO-3 shards)


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: its data is gathered on demand, this rank owns ``ds_tensor``."""
    return getattr(param, "ds_tensor", None) is not None


def warmup_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number ``updates + 1``: ``min(decay, (1 + t) / (10 + t))`` during warm-up."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


class WeightEMA(Callback):
    """The average of ``model``'s parameters (a Trainer callback: ``on_step`` after each training step)."""

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.params = dict(model.named_parameters())
        self.sharded = any(is_partitioned(p) for p in self.params.values())
        if self.sharded and not all(is_partitioned(p) for p in self.params.values()):
            raise RuntimeError("some parameters are ZeRO-3 partitioned and some not; the EMA needs one or the other")
        with torch.no_grad():
            self.shadow = {name: self._local(p).detach().to(torch.float32, copy=True) for name, p in self.params.items()}
            self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        self.updates = 0  # t: EMA updates so far
        self.optimizer_step = 0  # the engine's optimizer step at the last update

    @staticmethod
    def _local(param: torch.Tensor) -> torch.Tensor:
        """What this rank holds of ``param``: its ZeRO-3 partition, else the whole tensor."""
        return param.ds_tensor if is_partitioned(param) else param

    # ------------------------------------------------------------------ training

    def decay(self) -> float:
        return warmup_decay(self.cfg.decay, self.updates, self.cfg.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from ``model``'s current parameters (the ones ``__init__`` saw) and buffers."""
        d = self.decay()
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        current = [self._local(self.params[n]).detach().to(torch.float32) for n in names]
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, current, alpha=1.0 - d)
        for name, b in model.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(b)
        self.updates += 1

    def on_step(self, trainer: TrainerView, state: TrainState) -> None:
        """Update once the engine's optimizer steps reach the next multiple of ``every`` (at most once per
        training step; a step DeepSpeed did not take, e.g. mid-accumulation or skipped, moves nothing)."""
        step = int(trainer.engine.global_steps)  # a host counter: no device sync
        if step // self.cfg.every > self.optimizer_step // self.cfg.every:
            self.update(trainer.engine.module)
            self.optimizer_step = step

    def on_epoch_end(self, trainer: TrainerView, state: TrainState, row: dict[str, Any]) -> None:
        row["ema_updates"] = self.updates

    # ------------------------------------------------------------------ evaluation

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` with the averaged weights and the EMA's buffers inside the block; the raw weights and
        buffers come back bit for bit afterwards (also when the block raises). Collective under ZeRO-3."""
        raw = self._swap_in(model, self.shadow, self.buffers)
        try:
            yield model
        finally:
            self._swap_in(model, *raw)

    @torch.no_grad()
    def _swap_in(self, model: nn.Module, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Copy ``params``/``buffers`` into the model; returns what was there (exact copies)."""
        gathered = self._release_gathered() if self.sharded else []
        old_params = {}
        for name, value in params.items():
            local = self._local(self.params[name])
            old_params[name] = local.detach().clone()
            local.data.copy_(value)
        old_buffers = {}
        model_buffers = dict(model.named_buffers())
        for name, value in buffers.items():
            old_buffers[name] = model_buffers[name].detach().clone()
            model_buffers[name].copy_(value)
        if gathered:  # ZeRO-3 persistent parameters stay gathered: gather them again from the new partitions
            gathered[0].all_gather(param_list=gathered)
        return old_params, old_buffers

    def _release_gathered(self) -> list[torch.Tensor]:
        """ZeRO-3: free the gathered copies (the persistent small parameters) so that they can be rebuilt
        from the swapped partitions; the partition (``ds_tensor``) itself is kept. Returns them."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [p for p in self.params.values() if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered)
        return gathered

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (loadable with ``weights_only``). Under ZeRO-3: this rank's shards, with
        each parameter's full shape so that the shards can be put together offline."""
        state: dict[str, Any] = {"updates": self.updates, "optimizer_step": self.optimizer_step,
                                 "sharded": self.sharded, "params": dict(self.shadow), "buffers": dict(self.buffers)}
        if self.sharded:
            state["shapes"] = {n: list(p.ds_shape) for n, p in self.params.items()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state.get("sharded")) != self.sharded:
            raise ValueError(f"the checkpoint's EMA is {'sharded' if state.get('sharded') else 'a full copy'}, "
                             f"this run's is {'sharded' if self.sharded else 'a full copy'}")
        missing = sorted(set(self.shadow) - set(state["params"]))
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks parameters {missing[:3]}")
        for name, value in state["params"].items():
            if name in self.shadow:
                self.shadow[name].copy_(value)
        for name, value in state["buffers"].items():
            if name in self.buffers:
                self.buffers[name].copy_(value)
        self.updates, self.optimizer_step = int(state["updates"]), int(state["optimizer_step"])


def assemble(shards: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The full EMA state (parameters and buffers, by name) from every rank's saved ``state_dict``, in rank
    order: a full copy as it is, ZeRO-3 shards concatenated and cut to each parameter's shape."""
    first = shards[0]
    if not first.get("sharded"):
        return {**first["params"], **first["buffers"]}
    out: dict[str, torch.Tensor] = {}
    for name, shape in first["shapes"].items():
        numel = 1
        for s in shape:
            numel *= int(s)
        flat = torch.cat([s["params"][name].reshape(-1) for s in shards])
        out[name] = flat[:numel].reshape(shape).clone()
    return {**out, **first["buffers"]}
