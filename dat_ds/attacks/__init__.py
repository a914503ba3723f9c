"""Attacks: pure functions registered by name; the geometry (L-inf, L2) is separate from the loops."""

from __future__ import annotations

from typing import Callable

import torch

from ..core.config import AttackConfig, attack_step_size
from ..core.registry import Registry
from .core import eval_mode, fgsm, fgsm_rs, pgd
from .external import apgd_ce, apgd_dlr, autoattack, square
from .geometry import GEOMETRIES, L2Geometry, LinfGeometry
from .losses import ATTACK_LOSSES, ce_loss, margin_loss, misclassified

ATTACKS: Registry[Callable[..., torch.Tensor]] = Registry("attack")
ATTACKS.register("fgsm")(fgsm)
ATTACKS.register("fgsm_rs")(fgsm_rs)
ATTACKS.register("pgd")(pgd)
# Evaluation-only attacks through torchattacks (AutoAttack and its parts; Square is the black-box check).
ATTACKS.register("autoattack")(autoattack)
ATTACKS.register("apgd-ce")(apgd_ce)
ATTACKS.register("apgd-dlr")(apgd_dlr)
ATTACKS.register("square")(square)


def _no_attack(model, x, y, **_unused):
    return x


ATTACKS.register("none")(_no_attack)


def attack_from_config(cfg: AttackConfig, model, x, y, *, generator=None, loss_fn=ce_loss, **kwargs):
    """Run the configured training attack with the standard step size for its kind."""
    fn = ATTACKS.get(cfg.name)
    alpha = attack_step_size(cfg.name, cfg.eps, cfg.steps, cfg.step_size)
    return fn(model, x, y, eps=cfg.eps, step_size=alpha, steps=cfg.steps, norm=cfg.norm,
              restarts=cfg.restarts, generator=generator, loss_fn=loss_fn, **kwargs)


__all__ = [
    "ATTACKS", "ATTACK_LOSSES", "GEOMETRIES", "L2Geometry", "LinfGeometry", "apgd_ce", "apgd_dlr",
    "attack_from_config", "autoattack", "ce_loss", "eval_mode", "fgsm", "fgsm_rs", "margin_loss", "misclassified",
    "pgd", "square",
]
