"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training.

loss = BCE(f(x_adv), y) + beta * mean_i[ KL(f(x_i) || f(x_adv_i)) * (1 - p_y(x_i)) ]

where the "boosted" cross-entropy BCE adds -log(1 - max_{k != y} p_k(x_adv)) to CE(x_adv), pushing down
the strongest wrong class, and the KL term is weighted towards examples the model gets wrong on clean
inputs (small p_y). The attack is the configured CE attack (PGD-k), as in the paper.

``objective.label_smoothing`` smooths the CE(x_adv) part of BCE only: it is MART's one cross-entropy with the
label. The margin part -log(1 - max_{k != y} p_k) already targets one wrong class, and the KL weight
1 - p_y(x) reads the clean probability; neither is a CE with a one-hot target, so both stay as published.
(DM-Improves-AT's MART has no label smoothing; this is the natural extension.) The attack keeps plain CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import OBJECTIVES, Objective, ObjectiveOutput, attack_phase, supervised_ce
from .fast import training_attack
from .trades import kl_clean_adv


def boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-example CE(adv) - log(1 - p_k(adv)), k = the most probable wrong class; the CE is label-smoothed."""
    logits_adv = logits_adv.float()
    probs = F.softmax(logits_adv, dim=1)
    wrong = probs.scatter(1, y[:, None], -1.0).argmax(dim=1)
    p_wrong = probs.gather(1, wrong[:, None]).squeeze(1)
    # The small constant keeps the log finite when the wrong class takes all the mass.
    return supervised_ce(logits_adv, y, label_smoothing, reduction="none") - torch.log(1.0001 - p_wrong)


@OBJECTIVES.register("mart")
class Mart(Objective):
    """beta = ``objective.beta`` (the paper uses 5-6)."""

    gathers_attacks = True

    def __call__(self, ctx, x, y):
        beta = ctx.cfg.objective.beta
        with attack_phase(ctx):
            x_adv = training_attack(ctx, x, y)
        logits_adv = ctx.model(x_adv)
        logits_clean = ctx.model(x)
        loss_bce = boosted_ce(logits_adv, y, ctx.cfg.objective.label_smoothing).mean()
        p_true = F.softmax(logits_clean.float(), dim=1).gather(1, y[:, None]).squeeze(1)
        loss_kl = (kl_clean_adv(logits_clean, logits_adv) * (1.0 - p_true)).mean()
        return ObjectiveOutput(loss=loss_bce + beta * loss_kl, logits=logits_adv,
                               metrics={"loss_adv": loss_bce.detach(), "loss_kl": loss_kl.detach()})
