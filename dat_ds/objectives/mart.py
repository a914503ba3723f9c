"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training.

loss = BCE(f(x_adv), y) + beta * mean_i[ KL(f(x_i) || f(x_adv_i)) * (1 - p_y(x_i)) ]

where the "boosted" cross-entropy BCE adds -log(1 - max_{k != y} p_k(x_adv)) to CE(x_adv), pushing down
the strongest wrong class, and the KL term is weighted towards examples the model gets wrong on clean
inputs (small p_y). The attack is the configured CE attack (PGD-k), as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import attack_from_config
from .base import OBJECTIVES, Objective, ObjectiveOutput
from .trades import kl_clean_adv


def boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example CE(adv) - log(1 - p_k(adv)), k = the most probable wrong class."""
    logits_adv = logits_adv.float()
    probs = F.softmax(logits_adv, dim=1)
    wrong = probs.scatter(1, y[:, None], -1.0).argmax(dim=1)
    p_wrong = probs.gather(1, wrong[:, None]).squeeze(1)
    # The small constant keeps the log finite when the wrong class takes all the mass.
    return F.cross_entropy(logits_adv, y, reduction="none") - torch.log(1.0001 - p_wrong)


@OBJECTIVES.register("mart")
class Mart(Objective):
    """beta = ``objective.beta`` (the paper uses 5-6)."""

    def __call__(self, ctx, x, y):
        beta = ctx.cfg.objective.beta
        x_adv = attack_from_config(ctx.cfg.attack, ctx.module, x, y, generator=ctx.generator)
        logits_adv = ctx.model(x_adv)
        logits_clean = ctx.model(x)
        loss_bce = boosted_ce(logits_adv, y).mean()
        p_true = F.softmax(logits_clean.float(), dim=1).gather(1, y[:, None]).squeeze(1)
        loss_kl = (kl_clean_adv(logits_clean, logits_adv) * (1.0 - p_true)).mean()
        return ObjectiveOutput(loss=loss_bce + beta * loss_kl, logits=logits_adv,
                               metrics={"loss_adv": loss_bce.detach(), "loss_kl": loss_kl.detach()})
