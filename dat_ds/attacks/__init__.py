"""Attacks: pure functions registered by name; the geometry (L-inf, L2) is separate from the loops."""

from __future__ import annotations

from .core import NFGSM_NOISE_MULTIPLIER, default_step_size, eval_mode, fgsm, fgsm_rs, nfgsm, no_attack, pgd
from .external import STANDARD_STAGES, StageHook, apgd_ce, apgd_dlr, autoattack, square
from .geometry import GEOMETRIES, L2Geometry, LinfGeometry
from .losses import ATTACK_LOSSES, ce_loss, margin_loss, misclassified
from .precision import AttackPrecision, attack_view
from .registry import ATTACKS, attack_parameters
from .spec import AttackSpec, attack_from_config, eval_spec, takes, training_spec

__all__ = [
    "ATTACKS", "ATTACK_LOSSES", "AttackPrecision", "AttackSpec", "GEOMETRIES", "NFGSM_NOISE_MULTIPLIER", "L2Geometry", "LinfGeometry", "STANDARD_STAGES",
    "StageHook", "apgd_ce", "apgd_dlr",
    "attack_from_config", "attack_parameters", "attack_view", "autoattack", "ce_loss", "default_step_size", "eval_mode", "eval_spec",
    "fgsm", "fgsm_rs", "margin_loss", "nfgsm", "misclassified", "no_attack", "pgd", "square", "takes", "training_spec",
]
