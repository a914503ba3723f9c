"""The objective interface: what one training step minimises.

An objective is called as ``objective(ctx, x, y)`` and returns a dict with at least ``"loss"`` (a
scalar tensor). It may also return ``"logits"`` (predictions on the examples it trained on, for the
running train accuracy), ``"logits_clean"``, extra float metrics, and ``"after_backward"`` (a callable
the loop runs between ``engine.backward`` and ``engine.step``, e.g. Free-AT reads the input gradient
there). The training loop never changes when an objective is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import RunConfig
from ..core.registry import Registry


@dataclass
class ObjectiveContext:
    model: Callable[[torch.Tensor], torch.Tensor]  # training forward (the DeepSpeed engine)
    module: nn.Module  # the bare model, for attacks (eval mode, input gradients only)
    cfg: RunConfig
    generator: torch.Generator  # this rank's attack randomness
    step: int = 0  # global optimizer step, for schedules inside objectives


class Objective:
    """Base class; subclasses implement ``__call__``. ``replays`` > 1 feeds each batch several times."""

    replays: int = 1
    needs_labels: bool = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def __call__(self, ctx: ObjectiveContext, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


OBJECTIVES: Registry[type[Objective]] = Registry("objective")
