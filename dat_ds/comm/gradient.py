"""DAT's quantized gradient all-reduce around a plain optimizer (SGD, AdamW, LAMB, ...).

Enabled by a top-level ``"gradient_compression"`` section in the DeepSpeed JSON, e.g.
``{"type": "dat_quantizer", "bits": 8}``: ``dat_ds.runtime.ds_config`` strips it before
``deepspeed.initialize`` (and allows it with ZeRO 0 and fp32 weights only: fp32 or ``torch_autocast``
bf16), and ``dat_ds.runtime.build`` wraps the optimizer in :class:`QuantizedAllReduceOptimizer`, hands
the wrapper to DeepSpeed as its client optimizer and switches DeepSpeed's own gradient all-reduce off.
Each ``step()`` then first averages every rank's local gradient through the compressed all-reduce with
the unbiased b-bit quantizer (no error feedback needed) and then steps the wrapped optimizer, so every
rank steps with the same unbiased estimate of the mean gradient. DeepSpeed calls ``step()`` only at the
gradient accumulation boundary, with the micro-batches' gradients summed locally (each loss scaled by
1/accum): one quantized all-reduce per optimizer step, whatever ``gradient_accumulation_steps`` is.

``gradient_clipping`` in the JSON (DeepSpeed clips before ``step()``) therefore bounds each rank's
local gradient; their average is bounded by the same norm.

At world size 1 there is nothing to average: the gradients are left exact (no quantization noise, which
would save nothing) and ``step()`` is the wrapped optimizer's own; ``comm_stats()`` says ``skipped``.
``compress_single_rank=True`` keeps the quantizer on one process (for its tests).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch

from .allreduce import compressed_allreduce
from .backend import ByteMeter, TorchBackend
from .compressors import StochasticQuantizer
from .protocol import SKIPPED_NOTE
from .spec import DEFAULT_BITS, DEFAULT_BLOCK

log = logging.getLogger(__name__)


class QuantizedAllReduceOptimizer(torch.optim.Optimizer):
    """``optimizer``, with its gradients averaged over ranks through DAT's b-bit quantizer at each step.

    A :class:`~dat_ds.comm.protocol.CommunicatingOptimizer`. It holds no parameters or state of its own:
    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's (so LR schedulers, DeepSpeed's
    LR reporting and checkpoints see one set), and nothing is set on the wrapped optimizer.
    """

    label = "DAT gradient quantizer"
    warmup_steps = 0  # compressed from the first step: the quantizer is unbiased, nothing to warm up

    # Optimizer.__init__ is not called on purpose: it would build a second set of param_groups and state.
    def __init__(self, optimizer: torch.optim.Optimizer, *, bits: int = DEFAULT_BITS, block: int = DEFAULT_BLOCK,
                 seed: int = 0, process_group=None, compress_single_rank: bool = False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"QuantizedAllReduceOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, QuantizedAllReduceOptimizer):
            raise TypeError("the optimizer is already wrapped: its gradients would be averaged twice")
        self.optimizer = optimizer
        self.quantizer = StochasticQuantizer(bits=bits, block=block)
        self.seed = seed
        self.process_group = process_group
        self.compress_single_rank = compress_single_rank
        self.meter = ByteMeter()
        self.steps = 0  # compressed all-reduces so far: seeds the rounding noise, so it is checkpointed
        self._backend: TorchBackend | None = None
        # The wrapper's own hooks (torch's Optimizer API); the wrapped optimizer keeps its own.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    @property
    def scheme(self) -> str:
        return f"{self.quantizer.bits}-bit quantized gradients"

    @property
    def uncompressed(self) -> str:
        return type(self.optimizer).__name__  # on the exact average gradient

    @property
    def skips_compression(self) -> bool:
        """World size 1: nothing to communicate, so the gradients stay exact."""
        return self.backend.world == 1 and not self.compress_single_rank

    # ------------------------------------------------------------------ the wrapped optimizer's data
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_backend"}  # a process group does not pickle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._backend = None
        self._patch_step_function()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.quantizer.bits}-bit, block {self.quantizer.block}) around {self.optimizer!r}"

    @property
    def backend(self) -> TorchBackend:
        if self._backend is None:  # built at the first step: torch.distributed is up by then
            self._backend = TorchBackend(self.process_group, meter=self.meter)
        return self._backend

    # ------------------------------------------------------------------ torch.optim.Optimizer
    def step(self, closure=None):
        """Average the gradients (quantized), then step the wrapped optimizer with them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.average_gradients_()
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, plus the step counter and byte counts under ``"comm"``."""
        return {**self.optimizer.state_dict(), "comm": self._comm_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        comm = state_dict.pop("comm", None)
        self.optimizer.load_state_dict(state_dict)
        if comm is not None:
            self._load_comm_state(comm)

    # ------------------------------------------------------------------ the compressed all-reduce
    @torch.no_grad()
    def average_gradients_(self) -> None:
        """Replace every ``param.grad`` by the quantized average over ranks (missing grads count as 0)."""
        params = [p for g in self.param_groups for p in g["params"]]
        if not params or self.skips_compression:
            return
        grads = [p.grad.detach().float().reshape(-1) if p.grad is not None
                 else torch.zeros(p.numel(), device=p.device) for p in params]
        flat = torch.cat(grads)
        backend = self.backend
        self.meter.start_step()
        self.steps += 1
        generator = torch.Generator(device=flat.device).manual_seed(self.noise_seed(backend.rank, self.steps))
        averaged = compressed_allreduce(flat, self.quantizer, backend, generator=generator)
        for p, chunk in zip(params, torch.split(averaged, [p.numel() for p in params])):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(chunk.view_as(p))
        if self.steps == 1:
            log.info("%s (%d-bit): compressed gradient all-reduce engaged at step 1 on %d rank(s); this step sent "
                     "%d bytes vs %d for an fp32 all-reduce", self.label, self.quantizer.bits, backend.world,
                     self.meter.step_bytes_sent, self.meter.step_bytes_fp32_equiv)

    def noise_seed(self, rank: int, step: int) -> int:
        """Seed of the rounding noise: differs per rank and step, and is reproducible on resume."""
        return (self.seed * 1_000_003 + rank * 7919 + step) % (2**63)

    # ------------------------------------------------------------------ CommunicatingOptimizer
    def comm_stats(self) -> dict[str, Any]:
        world = self.backend.world
        skipped = self.skips_compression
        stats: dict[str, Any] = {"stage": "skipped" if skipped else "compressed" if self.steps else "warmup",
                                 "world_size": world, **self.meter.as_dict(), "compressed_steps": self.steps,
                                 "local_steps": 0, "bits": self.quantizer.bits}
        if world == 1:
            stats["note"] = SKIPPED_NOTE if skipped else "world size 1: nothing to communicate"
        return stats

    def _comm_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "meter": self.meter.state_dict()}

    def _load_comm_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.meter.load_state_dict(state["meter"])

    def rank_local_state(self) -> dict[str, Any]:
        """The step counter (it seeds this rank's rounding noise) and this rank's byte counts."""
        return self._comm_state()

    def load_rank_local_state(self, state: dict[str, Any]) -> None:
        self._load_comm_state(state)
