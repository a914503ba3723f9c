"""ZeRO-3 evaluation and training attacks on weights gathered once: a plain copy of the module that no collective
touches.

Under ZeRO-3 every forward of the engine's module all-gathers each layer's parameters, so every rank must
run the same number of forwards. Attacks that skip examples or stop early depending on the data (APGD,
Square, AutoAttack's ensemble) break that and hang the job until the collective timeout. Evaluation
therefore runs on :class:`GatheredCopy`: the full weights, gathered once per evaluation (a fixed number of
all-gathers, the same on every rank), in a module of the same architecture without ZeRO's hooks. It costs
one full copy of the weights per rank while evaluation runs -- what ZeRO-3's own forward holds layer by
layer, all at once.

Training attacks use the same copy (``attack.zero3_gather``, ``GatheredCopy.held``): gathered once per step
before the attack, so PGD-k costs one all-gather of the weights instead of one or two per attack step (each
forward of the engine's module gathers every layer again, and its backward too once a layer was released in
between: ``bench/results/zero3.json``), and freed after it, so the training forward and backward have the
memory back.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

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
        self._layouts: dict[str, tuple[torch.Size, tuple[int, ...]]] = {}  # each weight's shape and strides (release)
        self._released = False

    @staticmethod
    def nbytes(module: nn.Module) -> int:
        """What a copy of ``module`` holds: its full parameters (also those ZeRO-3 partitioned) and its buffers."""
        params = sum(ds_adapter.full_numel(p) * p.element_size() for p in module.parameters())
        return params + sum(b.numel() * b.element_size() for b in module.buffers())

    @contextlib.contextmanager
    def held(self, module: nn.Module) -> Iterator[nn.Module]:
        """:meth:`refresh` on entry (collective), its weights' memory freed on exit (:meth:`release`)."""
        try:
            yield self.refresh(module)
        finally:
            self.release()

    def release(self) -> None:
        """Free the copy's weights (buffers stay: they are small); the next :meth:`refresh` allocates them again."""
        if self._copy is None or self._released:
            return
        for p in self._copy.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self._released = True

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
            self._layouts = {n: (p.shape, p.stride()) for n, p in self._copy.named_parameters()}
            log.info("ZeRO-3: evaluation runs on a full copy of the weights, gathered once per evaluation")
        if self._released:
            for n, p in self._copy.named_parameters():
                size, stride = self._layouts[n]
                p.data = torch.empty_strided(size, stride, dtype=p.dtype, device=p.device)
            self._released = False
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
