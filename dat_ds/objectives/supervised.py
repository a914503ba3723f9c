"""Madry PGD-AT and DAT: cross-entropy on adversarial examples, plus lambda * CE on clean ones."""

from __future__ import annotations

import torch.nn.functional as F

from ..attacks import attack_from_config
from .base import OBJECTIVES, Objective, ObjectiveOutput


@OBJECTIVES.register("madry")
class Madry(Objective):
    """min_theta E max_delta CE(f(x + delta), y) (Madry et al. 2018)."""

    def __call__(self, ctx, x, y):
        x_adv = attack_from_config(ctx.cfg.attack, ctx.module, x, y, generator=ctx.generator)
        logits = ctx.model(x_adv)
        loss = F.cross_entropy(logits.float(), y)
        return ObjectiveOutput(loss=loss, logits=logits, metrics={"loss_adv": loss.detach()})


@OBJECTIVES.register("dat")
class DAT(Objective):
    """CE(adv) + lambda * CE(clean) (Zhang et al., UAI 2022); lambda = objective.clean_weight."""

    def __call__(self, ctx, x, y):
        lam = ctx.cfg.objective.clean_weight
        x_adv = attack_from_config(ctx.cfg.attack, ctx.module, x, y, generator=ctx.generator)
        logits = ctx.model(x_adv)
        loss_adv = F.cross_entropy(logits.float(), y)
        metrics = {"loss_adv": loss_adv.detach()}
        loss = loss_adv
        if lam > 0:
            loss_clean = F.cross_entropy(ctx.model(x).float(), y)
            metrics["loss_clean"] = loss_clean.detach()
            loss = loss_adv + lam * loss_clean
        return ObjectiveOutput(loss=loss, logits=logits, metrics=metrics)


@OBJECTIVES.register("clean")
class Clean(Objective):
    """Standard training (no attack): the baseline every robust objective is compared with."""

    def __call__(self, ctx, x, y):
        logits = ctx.model(x)
        loss = F.cross_entropy(logits.float(), y)
        return ObjectiveOutput(loss=loss, logits=logits)
