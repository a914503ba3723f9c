"""FARE (Schlarmann et al., ICML 2024): unsupervised robust fine-tuning of a pretrained encoder, labels ignored.

    min_theta  E_x  max_{||delta|| <= eps}  || f_theta(x + delta) - f_0(x) ||_2^2

f is the model of ``cfg.model`` (from ``model.weights``) without its classifier head (``models.remove_head``: the
pooled representation); f_0 is a frozen copy of it made when the model is built, before any step, so that
fine-tuning keeps f's features -- and whatever was built on them -- where they were on clean inputs while
making them stable in the eps-ball. The attack (``cfg.attack``: PGD-k, eps, norm, random start: the loss and its
gradient are 0 at delta = 0 while f = f_0) maximises the per-example squared distance; training minimises its
batch mean on the attack's result.

f_0 lives inside the trained module (:class:`FareModel`, ``reference``) with ``requires_grad`` off: the optimizer
never sees it (``optim.param_groups`` skips frozen tensors), it stays in eval mode, ZeRO-3 partitions it over the
ranks like every parameter of the module (and gathers it layer by layer for its forwards), and it is saved in
every checkpoint with the model (DeepSpeed writes ZeRO-3's frozen partitions too), so a resumed run gets the f_0
its first step had even if ``model.weights`` has changed since (``model.weights`` must still exist at resume: the
model is built from it before the checkpoint's weights replace it).

Evaluate the result with ``dat-ds finetune --encoder RUN --mode slf|alf|aff`` (a linear probe on f); the
trainer's accuracy columns compare the argmax of a feature vector with a label and mean nothing here.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..attacks import eval_mode
from ..models import remove_head
from .base import OBJECTIVES, Objective, ObjectiveOutput, attack_phase
from .fast import training_attack

log = logging.getLogger(__name__)


class FareModel(nn.Module):
    """The encoder being fine-tuned (``encoder``) and its frozen original (``reference``, f_0)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.reference = copy.deepcopy(encoder).requires_grad_(False).eval()
        self._original = False

    def train(self, mode: bool = True) -> FareModel:
        super().train(mode)
        self.reference.eval()  # f_0's BatchNorm statistics and dropout stay as they were
        return self

    @contextmanager
    def original(self) -> Iterator[FareModel]:
        """Forwards inside run f_0: its features come through the same wrappers (training precision) as f's."""
        self._original = True
        try:
            yield self
        finally:
            self._original = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference(x) if self._original else self.encoder(x)


def fare_model_of(module: nn.Module) -> FareModel:
    """The :class:`FareModel` inside ``module`` (itself, or inside the precision wrappers attacks call)."""
    found = next((m for m in module.modules() if isinstance(m, FareModel)), None)
    if found is None:
        raise TypeError(f"objective fare trains a FareModel, got {type(module).__name__}")
    return found


def squared_distance(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example ``||features - target||_2^2`` in fp32: FARE's loss, and its attack's (``loss_fn(output, target)``)."""
    return (features.float() - target.float()).flatten(1).pow(2).sum(dim=1)


def original_features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f_0(x), without a graph: the target of both the attack and the training loss."""
    with fare_model_of(module).original(), eval_mode(module), torch.no_grad():
        return module(x).float()


@OBJECTIVES.register("fare")
class FARE(Objective):
    needs_labels = False
    gathers_attacks = True  # f_0's target and the attack: on the ZeRO-3 copy gathered once per step (attack_phase)

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.model.weights is None:
            log.warning("objective fare without model.weights: f_0 is the randomly initialised encoder, which makes a "
                        "smoke test, not robust fine-tuning; give the pretrained weights with model.weights")

    @staticmethod
    def prepare_model(cfg, spec, model):
        remove_head(model.backbone, cfg.model.name)
        return FareModel(model)

    def __call__(self, ctx, x, y):
        with attack_phase(ctx):
            target = original_features(ctx.attack_module, x)
            x_adv = training_attack(ctx, x, target, loss_fn=squared_distance, success_fn=None)
        features = ctx.model(x_adv)
        loss = squared_distance(features, target).mean()
        return ObjectiveOutput(loss=loss, metrics={"loss_adv": loss.detach()})
