"""Madry PGD-AT and DAT: cross-entropy on adversarial examples, plus lambda * CE on clean ones.

Both take ``objective.grad_align`` (GradAlign, Andriushchenko & Flammarion 2020): lambda * (1 - cos) of the
input gradients at x and at x + eta is added to the loss, which keeps FGSM-RS / N-FGSM training from
catastrophic overfitting; ``engine.backward`` differentiates through it (double backprop). Its forwards go
through the bare module (``ctx.module``, in train mode here): DeepSpeed's engine forward hooks its output so
that any backward through it other than ``engine.backward`` -- ``torch.autograd.grad`` included -- is an error.
"""

from __future__ import annotations

from .base import OBJECTIVES, AdversarialBatch, Objective, ObjectiveOutput, SplitObjective, attack_phase, supervised_ce
from .fast import grad_align, training_attack


def _with_grad_align(ctx, x, y, loss, metrics):
    """``loss`` plus GradAlign's term when ``objective.grad_align`` > 0 (its 1 - cos goes to the metrics)."""
    lam = ctx.cfg.objective.grad_align
    if lam <= 0:
        return loss
    a = ctx.cfg.attack
    penalty, _ = grad_align(ctx.module, x, y, eps=a.eps, norm=a.norm, generator=ctx.generator)
    metrics["grad_align"] = penalty.detach()
    return loss + lam * penalty


class _AdversarialCE(SplitObjective):
    """CE(f(x + delta), y) + lambda * CE(f(x), y): Madry's objective is lambda = 0, DAT's any lambda."""

    gathers_attacks = True

    def clean_weight(self, ctx) -> float:
        raise NotImplementedError

    def adversarial_batch(self, ctx, x, y):
        with attack_phase(ctx):
            return AdversarialBatch(x=x, y=y, x_adv=training_attack(ctx, x, y))

    def loss(self, ctx, model, batch):
        x, y = batch.x, batch.y
        lam = self.clean_weight(ctx)
        logits = model(batch.x_adv)
        loss_adv = supervised_ce(logits, y, ctx.cfg.objective.label_smoothing)
        metrics = {"loss_adv": loss_adv.detach()}
        loss = loss_adv
        if lam > 0:
            loss_clean = supervised_ce(model(x), y, ctx.cfg.objective.label_smoothing)
            metrics["loss_clean"] = loss_clean.detach()
            loss = loss_adv + lam * loss_clean
        loss = _with_grad_align(ctx, x, y, loss, metrics)
        return ObjectiveOutput(loss=loss, logits=logits, metrics=metrics)


@OBJECTIVES.register("madry")
class Madry(_AdversarialCE):
    """min_theta E max_delta CE(f(x + delta), y) (Madry et al. 2018)."""

    def clean_weight(self, ctx) -> float:
        return 0.0


@OBJECTIVES.register("dat")
class DAT(_AdversarialCE):
    """CE(adv) + lambda * CE(clean) (Zhang et al., UAI 2022); lambda = objective.clean_weight."""

    def clean_weight(self, ctx) -> float:
        return ctx.cfg.objective.clean_weight


@OBJECTIVES.register("clean")
class Clean(Objective):
    """Standard training (no attack): the baseline every robust objective is compared with."""

    def __call__(self, ctx, x, y):
        logits = ctx.model(x)
        loss = supervised_ce(logits, y, ctx.cfg.objective.label_smoothing)
        return ObjectiveOutput(loss=loss, logits=logits)
