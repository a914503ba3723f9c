"""ZeRO-3 evaluation on weights gathered once: a plain copy of the module that no collective touches.

Under ZeRO-3 every forward of the engine's module all-gathers each layer's parameters, so every rank must
run the same number of forwards. Attacks that skip examples or stop early depending on the data (APGD,
Square, AutoAttack's ensemble) break that and hang the job until the collective timeout. Evaluation
therefore runs on :class:`GatheredCopy`: the full weights, gathered once per evaluation (a fixed number of
all-gathers, the same on every rank), in a module of the same architecture without ZeRO's hooks. It costs
one full copy of the weights per rank while evaluation runs -- what ZeRO-3's own forward holds layer by
layer, all at once.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from . import ds_adapter

log = logging.getLogger(__name__)

GATHER_NUMEL = 1 << 26  # parameters per all-gather: 256 MB of fp32 at a time, not the whole model twice


class GatheredCopy:
    """A hook-free copy of a ZeRO-3 module, refreshed from its partitions by :meth:`refresh` (collective)."""

    def __init__(self, build: Callable[[], nn.Module], view: Callable[[nn.Module], nn.Module] = lambda m: m):
        self._build, self._view = build, view
        self._copy: nn.Module | None = None
        self._viewed: nn.Module | None = None  # built once: a view may keep state across evaluations (fp16's grad scale)

    def refresh(self, module: nn.Module) -> nn.Module:
        """The copy holding ``module``'s current weights, seen through ``view`` (every rank calls it: it all-gathers
        them)."""
        import deepspeed

        if self._copy is None:
            with torch.random.fork_rng(devices=[]):  # building draws initial weights: training's stream stays as it was
                copy = self._build()
            ref = next(module.parameters())
            self._copy = copy.to(device=ref.device, dtype=ref.dtype)
            self._viewed = self._view(self._copy)
            log.info("ZeRO-3 evaluation: on a full copy of the weights, gathered once per evaluation")
        params = dict(module.named_parameters())
        targets = dict(self._copy.named_parameters())
        if params.keys() != targets.keys():
            raise RuntimeError(f"the evaluation copy's parameters differ from the engine's: "
                               f"{sorted(params.keys() ^ targets.keys())[:5]}")
        names = list(params)
        for chunk in _chunks(names, [ds_adapter.full_numel(params[n]) for n in names]):
            with deepspeed.zero.GatheredParameters([params[n] for n in chunk], modifier_rank=None), torch.no_grad():
                for n in chunk:
                    targets[n].copy_(params[n].data)
        with torch.no_grad():
            buffers = dict(self._copy.named_buffers())
            for name, b in module.named_buffers():  # never partitioned: BatchNorm statistics and the like
                buffers[name].copy_(b)
        return self._viewed


def _chunks(names: list[str], numels: list[int]) -> list[list[str]]:
    """Consecutive parameter names, about ``GATHER_NUMEL`` elements per chunk (each chunk one all-gather)."""
    out: list[list[str]] = [[]]
    size = 0
    for name, n in zip(names, numels):
        if out[-1] and size + n > GATHER_NUMEL:
            out.append([])
            size = 0
        out[-1].append(name)
        size += n
    return out
