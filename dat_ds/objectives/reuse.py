"""Perturbation reuse (ATTA, Zheng et al., CVPR 2020): each example's attack starts where its last one ended.

Adversarial perturbations of one example change little from one epoch to the next, so a PGD-1/2 started
from the previous epoch's delta does the work of a PGD-10 started at random. ``PerturbationStore`` keeps
this rank's last delta of every example of its shard (``attack.reuse``; the sampler gives each rank the
same examples every epoch), indexed by the example's position in the training set.

Storage is one byte per pixel value: delta in [-eps, eps] is mapped to 0..255, so a stored delta is
within eps/255 of the real one (the quantiser rounds to the nearest of 256 levels 2*eps/255 apart). An
L-inf delta fills that interval; an L2 delta's coordinates lie in it too, and the attack projects the
start back onto its ball anyway. The store lives on the training device (no host sync per step) and is
saved in every checkpoint, per rank, so a resumed run starts from the same perturbations.

Limitation: with ``data.augment`` the stored delta belongs to last epoch's crop and flip of the image;
ATTA transforms it along with the image, this store does not (it is still a valid start in the ball).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

from ..core.errors import ConfigError

log = logging.getLogger(__name__)
LEVELS = 255  # uint8 codes 0..255: 255 steps across [-eps, eps]


def reuse_bytes(shard_examples: int, example_shape: Sequence[int]) -> int:
    """Bytes a store for ``shard_examples`` examples of ``example_shape`` (C, H, W) takes: one per value."""
    return shard_examples * math.prod(example_shape)


def check_reuse_budget(num_examples: int, world_size: int, example_shape: Sequence[int], max_bytes: int) -> int:
    """The bytes the largest rank's store needs; ConfigError (one line) if that exceeds ``max_bytes``.

    The same answer on every rank (it uses the largest shard, ceil(N / world)), so all ranks raise together.
    """
    shard = -(-num_examples // world_size)
    needed = reuse_bytes(shard, example_shape)
    if needed > max_bytes:
        shape = "x".join(str(d) for d in example_shape)
        raise ConfigError(f"attack.reuse_max_bytes={max_bytes} is too small: perturbation reuse needs {needed} bytes "
                          f"per rank ({shard} examples of {shape} in a rank's shard of {num_examples} on {world_size} "
                          f"rank(s)); set attack.reuse_max_bytes={needed} or more, use more ranks, or turn attack.reuse off")
    return needed


class PerturbationStore:
    """This rank's last perturbation of each example of its shard, uint8-quantised, on ``device``."""

    def __init__(self, shard: Sequence[int] | torch.Tensor, num_examples: int, example_shape: Sequence[int],
                 eps: float, device: torch.device | str = "cpu"):
        self.eps = float(eps)
        self.shape = tuple(int(d) for d in example_shape)
        self.ids = torch.as_tensor(shard, dtype=torch.int64).cpu()
        self.device = torch.device(device)
        self.slot = torch.full((num_examples,), -1, dtype=torch.int64)
        self.slot[self.ids] = torch.arange(len(self.ids))
        self.slot = self.slot.to(self.device)
        self.codes = torch.zeros((len(self.ids), *self.shape), dtype=torch.uint8, device=self.device)
        self.filled = torch.zeros(len(self.ids), dtype=torch.bool, device=self.device)

    @property
    def nbytes(self) -> int:
        return self.codes.numel()

    def quantise(self, delta: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return torch.zeros_like(delta, dtype=torch.uint8)
        scaled = (delta.float().clamp(-self.eps, self.eps) + self.eps) * (LEVELS / (2 * self.eps))
        return scaled.round_().clamp_(0, LEVELS).to(torch.uint8)

    def dequantise(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (codes.to(torch.float32) * (2 * self.eps / LEVELS) - self.eps).to(dtype)

    def _slots(self, index: torch.Tensor) -> torch.Tensor:
        # The ids come from this rank's sampler, so each is in the shard (checking would cost a host sync).
        return self.slot[index.to(self.device, torch.int64)]

    def initial_delta(self, index: torch.Tensor, random_delta: torch.Tensor) -> torch.Tensor:
        """Each example's stored delta, or ``random_delta`` (the attack's own random start) where none is stored yet."""
        slots = self._slots(index)
        stored = self.dequantise(self.codes[slots], random_delta.dtype).to(random_delta.device)
        have = self.filled[slots].to(random_delta.device).view(-1, *([1] * (random_delta.dim() - 1)))
        return torch.where(have, stored, random_delta)

    def update(self, index: torch.Tensor, delta: torch.Tensor) -> None:
        """Keep ``delta`` (the batch's final perturbation) for each example of ``index``."""
        if tuple(delta.shape[1:]) != self.shape:
            raise ValueError(f"perturbations of shape {tuple(delta.shape[1:])} for a store of {self.shape}")
        slots = self._slots(index)
        self.codes[slots] = self.quantise(delta.detach()).to(self.device)
        self.filled[slots] = True

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (loadable with ``weights_only``): this rank's shard, its codes and which are filled."""
        return {"ids": self.ids.clone(), "codes": self.codes.cpu(), "filled": self.filled.cpu(),
                "eps": torch.tensor(self.eps, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        same = (torch.equal(state["ids"], self.ids) and tuple(state["codes"].shape[1:]) == self.shape
                and float(state["eps"]) == self.eps)
        if not same:  # another shard (world size), image size or radius: the saved deltas do not apply
            log.warning("stored perturbations do not match this rank's shard, image size or eps; "
                        "attack.reuse starts again from random starts")
            return
        self.codes.copy_(state["codes"].to(self.device))
        self.filled.copy_(state["filled"].to(self.device))
