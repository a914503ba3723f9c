"""TRADES (Zhang et al., ICML 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)).

The inner maximisation is the configured attack (``cfg.attack``: PGD-k, eps, norm) run on the KL
divergence to the clean prediction instead of on the cross-entropy, so it needs no labels. The clean
prediction that serves as the attack's target is taken in eval mode (like the attack itself) and
detached; the training loss then uses train-mode forwards through the engine. ``objective.label_smoothing``
smooths the natural CE term only (as DM-Improves-AT does); the KL term and the attack are unchanged.

``objective.consistency: {weight, temperature}`` (Tack et al. 2022, ``mixing.py``) trains on two random views of
the batch (2B examples) and adds weight * JS between the two views' tempered adversarial predictions.
``objective.cutmix: {alpha, prob}`` mixes the batch (``mixing.cutmix``): the natural term is the (smoothed) CE to
the soft labels and the attack maximises the KL to them, as in DM-Improves-AT.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..attacks import eval_mode
from .base import OBJECTIVES, AdversarialBatch, ObjectiveOutput, SplitObjective, attack_phase, supervised_ce
from .fast import training_attack
from .mixing import consistency_views, cutmix, js_divergence


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
    with eval_mode(ctx.attack_module), torch.no_grad():
        target = F.softmax(ctx.attack_module(x).float(), dim=1)
    # success_fn=None: with restarts the worst case is the one with the largest KL (no notion of "fooled").
    return training_attack(ctx, x, target, loss_fn=kl_to_target, success_fn=None)


@OBJECTIVES.register("trades")
class Trades(SplitObjective):
    """beta = ``objective.beta`` (6 in the paper); beta = 0 is standard training and skips the attack.

    The attack runs before the training forwards, as in the authors' ``trades_loss``."""

    gathers_attacks = True

    def adversarial_batch(self, ctx, x, y):
        # beta = 0 attacks nothing: no phase, so ZeRO-3 gathers no weights for it
        with attack_phase(ctx) if ctx.cfg.objective.beta > 0 else contextlib.nullcontext():
            return self._adversarial_batch(ctx, x, y)

    def _adversarial_batch(self, ctx, x, y):
        beta, consistency = ctx.cfg.objective.beta, ctx.cfg.objective.consistency
        cutmix_cfg = ctx.cfg.objective.cutmix
        if consistency is not None:  # Tack et al.: TRADES on two views of the batch, + lambda * JS between them
            x, y = consistency_views(x, ctx.generator), torch.cat([y, y])
        soft = None
        if cutmix_cfg is not None:  # soft labels: the class count comes from the model's output
            with eval_mode(ctx.attack_module), torch.no_grad():
                num_classes = ctx.attack_module(x[:1]).shape[1]
            x, soft = cutmix(x, y, num_classes, alpha=cutmix_cfg.alpha, prob=cutmix_cfg.prob, generator=ctx.generator)
        x_adv = None
        if beta > 0:
            # Under CutMix the attack's KL target is the soft label, as in DM-Improves-AT's trades_loss(use_cutmix).
            x_adv = kl_attack(ctx, x) if soft is None else training_attack(ctx, x, soft, loss_fn=kl_to_target,
                                                                           success_fn=None)
        return AdversarialBatch(x=x, y=y, x_adv=x_adv, soft=soft)

    def loss(self, ctx, model, batch):
        beta, consistency = ctx.cfg.objective.beta, ctx.cfg.objective.consistency
        x, y, soft = batch.x, batch.y, batch.soft
        logits_clean = model(x)
        # The KL term is not smoothed; under CutMix the natural term is the CE to the soft labels.
        loss_clean = supervised_ce(logits_clean, y if soft is None else soft, ctx.cfg.objective.label_smoothing)
        metrics = {"loss_clean": loss_clean.detach()}
        loss, logits = loss_clean, logits_clean
        if beta > 0:
            logits = model(batch.x_adv)
            loss_kl = kl_clean_adv(logits_clean, logits).mean()
            metrics["loss_kl"] = loss_kl.detach()
            loss = loss + beta * loss_kl
        if consistency is not None:  # on the adversarial predictions (the clean ones when beta = 0: no attack)
            view1, view2 = logits.chunk(2)
            loss_js = js_divergence(view1, view2, consistency.temperature)
            metrics["loss_consistency"] = loss_js.detach()
            loss = loss + consistency.weight * loss_js
            # The running train accuracy counts one prediction per batch example: view 1's (the loop's count is B).
            return ObjectiveOutput(loss=loss, logits=view1, metrics=metrics)
        # Under CutMix the running accuracy reads the label holding the larger share of each image.
        return ObjectiveOutput(loss=loss, logits=logits, targets=None if soft is None else soft.argmax(dim=1),
                               metrics=metrics)
