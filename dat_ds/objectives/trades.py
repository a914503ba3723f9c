"""TRADES (Zhang et al., ICML 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)).

The inner maximisation is the configured attack (``cfg.attack``: PGD-k, eps, norm) run on the KL
divergence to the clean prediction instead of on the cross-entropy, so it needs no labels. The clean
prediction that serves as the attack's target is taken in eval mode (like the attack itself) and
detached; the training loss then uses train-mode forwards through the engine. ``objective.label_smoothing``
smooths the natural CE term only (as DM-Improves-AT does); the KL term and the attack are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import eval_mode
from .base import OBJECTIVES, Objective, ObjectiveOutput, supervised_ce
from .fast import training_attack


def kl_to_target(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-example KL(target || softmax(logits)): the attack loss of TRADES (``loss_fn(output, target)``)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return F.kl_div(log_p, target_probs, reduction="none").sum(dim=1)


def kl_clean_adv(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-example KL(softmax(clean) || softmax(adv)), differentiable in both arguments."""
    log_clean = F.log_softmax(logits_clean.float(), dim=1)
    log_adv = F.log_softmax(logits_adv.float(), dim=1)
    return (log_clean.exp() * (log_clean - log_adv)).sum(dim=1)


def kl_attack(ctx, x: torch.Tensor) -> torch.Tensor:
    """Adversarial examples that maximise KL(f(x) || f(x_adv)) under ``cfg.attack`` (no labels used)."""
    with eval_mode(ctx.module), torch.no_grad():
        target = F.softmax(ctx.module(x).float(), dim=1)
    # success_fn=None: with restarts the worst case is the one with the largest KL (no notion of "fooled").
    return training_attack(ctx, x, target, loss_fn=kl_to_target, success_fn=None)


@OBJECTIVES.register("trades")
class Trades(Objective):
    """beta = ``objective.beta`` (6 in the paper); beta = 0 is standard training and skips the attack."""

    def __call__(self, ctx, x, y):
        beta = ctx.cfg.objective.beta
        logits_clean = ctx.model(x)
        loss_clean = supervised_ce(logits_clean, y, ctx.cfg.objective.label_smoothing)  # the KL term is not smoothed
        if beta == 0:
            return ObjectiveOutput(loss=loss_clean, logits=logits_clean, metrics={"loss_clean": loss_clean.detach()})
        x_adv = kl_attack(ctx, x)
        logits_adv = ctx.model(x_adv)
        loss_kl = kl_clean_adv(logits_clean, logits_adv).mean()
        return ObjectiveOutput(loss=loss_clean + beta * loss_kl, logits=logits_adv,
                               metrics={"loss_clean": loss_clean.detach(), "loss_kl": loss_kl.detach()})
