"""ACL: adversarial contrastive learning (Jiang et al., NeurIPS 2020), labels ignored.

Per batch: two SimCLR views of each image; each view is attacked (``cfg.attack``: PGD-k, eps) to
maximise its per-example NT-Xent against the other view's detached embedding; the loss is NT-Xent on
the two adversarial views plus ``objective.clean_weight`` times NT-Xent on the clean views (ACL's
"A2A" pair with a clean term; 0 drops it). ``objective.temperature`` is tau.

The model is an encoder + projection head (``ssl_model.ContrastiveModel``); ``prepare_model`` builds
it from ``cfg.model.name`` when the trainer asks. The trainer's accuracy columns compare the argmax of
an embedding with a label and mean nothing for this objective: evaluate with ``dat-ds finetune``.
The running "train acc" it logs is the contrastive accuracy (is each view's nearest neighbour its twin?).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ..attacks import attack_from_config, eval_mode
from .augment import two_views
from .base import OBJECTIVES, Objective, ObjectiveOutput, attack_phase
from .nt_xent import nt_xent, nt_xent_to_target
from .ssl_model import build_contrastive_model


def contrastive_attack(ctx, view: torch.Tensor, other_embedding: torch.Tensor) -> torch.Tensor:
    """``view`` perturbed within ``cfg.attack`` to maximise its NT-Xent against ``other_embedding``."""
    loss_fn = partial(nt_xent_to_target, temperature=ctx.cfg.objective.temperature)
    return attack_from_config(ctx.cfg.attack, ctx.attack_module, view, other_embedding.detach(), generator=ctx.generator,
                              loss_fn=loss_fn, success_fn=None)


@OBJECTIVES.register("acl")
class ACL(Objective):
    needs_labels = False
    gathers_attacks = True

    @staticmethod
    def prepare_model(cfg, spec, model):
        return build_contrastive_model(cfg, spec)

    def __call__(self, ctx, x, y):
        tau, lam = ctx.cfg.objective.temperature, ctx.cfg.objective.clean_weight
        v1, v2 = two_views(x, ctx.generator)
        with attack_phase(ctx):
            with eval_mode(ctx.attack_module), torch.no_grad():
                t1, t2 = ctx.attack_module(v1), ctx.attack_module(v2)
            x1 = contrastive_attack(ctx, v1, t2)
            x2 = contrastive_attack(ctx, v2, t1)
        z1, z2 = ctx.model(x1), ctx.model(x2)
        loss_adv = nt_xent(z1, z2, tau)
        metrics = {"loss_adv": loss_adv.detach()}
        loss = loss_adv
        if lam > 0:
            loss_clean = nt_xent(ctx.model(v1), ctx.model(v2), tau)
            loss = loss + lam * loss_clean
            metrics["loss_clean"] = loss_clean.detach()
        with torch.no_grad():
            sim = F.normalize(z1.float(), dim=1) @ F.normalize(z2.float(), dim=1).t()
        return ObjectiveOutput(loss=loss, logits=sim, targets=torch.arange(x.shape[0], device=x.device),
                               metrics=metrics)
