"""``attack.eps_warmup_epochs``: the training attack's eps ramps linearly from ~0 to eps over the first epochs.

Used by the ViT recipes (Debenedetti et al. 2022): a weak model trained at the full eps from step 0 may not learn
at all. At the 0-based global training step t (a batch: Free-AT's replays of one batch share it)::

    eps_t = eps * min(1, (t + 1) / W),    W = max(1, round(eps_warmup_epochs * steps_per_epoch))

so the ramp is smooth per step, not per epoch, and the first step attacks at eps / W. The step size follows in
proportion: the standard steps (``attacks.default_step_size``) are proportional to eps already, and an explicit
``attack.step_size`` is scaled by the same factor. It depends only on the global step, so a resumed run continues
the ramp exactly. Everything that is not the training attack -- the per-epoch robust evaluation, the overfitting
monitor, ``dat-ds eval`` and GradAlign's noise ball -- reads ``cfg.attack``/``cfg.eval`` and so uses the full eps.
"""

from __future__ import annotations

from ..core.config import AttackConfig, replace


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """W: the training steps the ramp takes (0 when it is off)."""
    if warmup_epochs <= 0:
        return 0
    return max(1, round(warmup_epochs * steps_per_epoch))


def eps_factor(step: int, warmup_epochs: float, steps_per_epoch: int) -> float:
    """The fraction of eps the training attack uses at 0-based global step ``step``: min(1, (step + 1) / W)."""
    total = warmup_steps(warmup_epochs, steps_per_epoch)
    if total == 0:
        return 1.0
    return min(1.0, (max(step, 0) + 1) / total)


def warmed_up(cfg: AttackConfig, step: int, steps_per_epoch: int) -> AttackConfig:
    """``cfg`` with eps (and an explicit step size) scaled for ``step``; ``cfg`` itself once the ramp is over."""
    factor = eps_factor(step, cfg.eps_warmup_epochs, steps_per_epoch)
    if factor >= 1.0:
        return cfg
    step_size = None if cfg.step_size is None else cfg.step_size * factor
    return replace(cfg, eps=cfg.eps * factor, step_size=step_size)


def describe(cfg: AttackConfig, steps_per_epoch: int) -> str:
    """One line for the run log."""
    total = warmup_steps(cfg.eps_warmup_epochs, steps_per_epoch)
    return (f"attack.eps_warmup_epochs={cfg.eps_warmup_epochs:g}: the training attack's eps ramps linearly from "
            f"{cfg.eps / total:.4g} to {cfg.eps:.4g} over the first {total} steps (step size in proportion); "
            "evaluation uses the full eps")
