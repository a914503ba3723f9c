"""DAT's quantized gradient all-reduce for plain optimizers (SGD, AdamW, LAMB, ...).

Enabled by a top-level ``"gradient_compression"`` section in the DeepSpeed JSON, e.g.
``{"type": "dat_quantizer", "bits": 8}``; ``dat_ds.engine.ds_config`` strips it before
``deepspeed.initialize`` and the trainer attaches this object to the optimizer with a step pre-hook
and switches DeepSpeed's own gradient all-reduce off. Before every ``optimizer.step()`` each rank's
gradient goes through the compressed all-reduce with the unbiased b-bit quantizer (no error feedback
needed), so every rank steps with the same unbiased estimate of the mean gradient.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..core.errors import ConfigError
from .allreduce import compressed_allreduce
from .backend import ByteMeter, TorchBackend
from .compressors import StochasticQuantizer

log = logging.getLogger(__name__)

GRADIENT_COMPRESSION_TYPES = ("dat_quantizer",)
_KEYS = frozenset({"type", "bits", "block"})


def check_gradient_compression(section: Any) -> dict[str, Any]:
    """Validate the JSON section; returns it with defaults filled in."""
    if not isinstance(section, dict) or "type" not in section:
        raise ConfigError('DeepSpeed config "gradient_compression" must be an object like {"type": "dat_quantizer", "bits": 8}')
    unknown = sorted(set(section) - _KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in gradient_compression; allowed: {', '.join(sorted(_KEYS))}")
    if section["type"] not in GRADIENT_COMPRESSION_TYPES:
        raise ConfigError(f"gradient_compression type {section['type']!r} is unknown; choose one of: "
                          f"{', '.join(GRADIENT_COMPRESSION_TYPES)}")
    out = {"type": section["type"], "bits": section.get("bits", 8), "block": section.get("block", 256)}
    StochasticQuantizer(bits=out["bits"], block=out["block"])  # raises ConfigError on bad values
    return out


class QuantizedGradientAllReduce:
    """Averages ``param.grad`` over ranks through DAT's unbiased b-bit quantizer, before each step."""

    label = "DAT gradient quantizer"

    def __init__(self, bits: int = 8, block: int = 256, seed: int = 0, process_group=None):
        self.quantizer = StochasticQuantizer(bits=bits, block=block)
        self.seed = seed
        self.process_group = process_group
        self.meter = ByteMeter()
        self._backend: TorchBackend | None = None
        self.steps = 0
        self._logged = False

    @property
    def backend(self) -> TorchBackend:
        if self._backend is None:
            self._backend = TorchBackend(self.process_group, meter=self.meter)
        return self._backend

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Quantize-and-average the gradients at every ``optimizer.step()``; expose ``comm_stats`` on it."""
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.reduce_(opt))
        optimizer.comm_stats = self.comm_stats  # the training loop logs it into metrics.jsonl
        # Checkpoints keep the step counter (it seeds the rounding noise) and the byte counts per rank.
        optimizer.rank_local_state = self.rank_local_state
        optimizer.load_rank_local_state = self.load_rank_local_state
        return optimizer

    def rank_local_state(self) -> dict[str, Any]:
        return {"steps": self.steps, "meter": self.meter.state_dict()}

    def load_rank_local_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.meter.load_state_dict(state["meter"])
        self._logged = self.steps > 0

    @torch.no_grad()
    def reduce_(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grads = [p.grad.detach().float().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                 for p in params]
        flat = torch.cat(grads)
        backend = self.backend
        self.meter.start_step()
        self.steps += 1
        # Seeded by (seed, rank, step): the rounding noise differs per rank and is reproducible on resume.
        generator = torch.Generator(device=flat.device).manual_seed(
            (self.seed * 1_000_003 + backend.rank * 7919 + self.steps) % (2**63))
        averaged = compressed_allreduce(flat, self.quantizer, backend, generator=generator)
        for p, chunk in zip(params, torch.split(averaged, [p.numel() for p in params])):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(chunk.view_as(p))
        if not self._logged:
            self._logged = True
            log.info("%s (%d-bit): compressed gradient all-reduce engaged at step 1 on %d rank(s); this step sent "
                     "%d bytes vs %d for an fp32 all-reduce", self.label, self.quantizer.bits, backend.world,
                     self.meter.step_bytes_sent, self.meter.step_bytes_fp32_equiv)

    def comm_stats(self) -> dict[str, Any]:
        world = self.backend.world
        stats: dict[str, Any] = {"stage": "compressed" if self.steps else "warmup", "world_size": world,
                                 **self.meter.as_dict(), "compressed_steps": self.steps, "local_steps": 0,
                                 "bits": self.quantizer.bits}
        if world == 1:
            stats["note"] = "world size 1: nothing to communicate"
        return stats
