"""Training objectives, registered by name; each returns an ``ObjectiveOutput``."""

from . import contrastive, fare, free, mart, supervised, trades  # noqa: F401  (register acl, fare, free, mart, madry, dat, clean, trades)
from .base import OBJECTIVES, Objective, ObjectiveContext, ObjectiveOutput, attack_phase, plain_step


def build_objective(cfg) -> Objective:
    """``cfg.objective``, wrapped in adversarial weight perturbation when ``cfg.awp`` is set."""
    objective = OBJECTIVES.get(cfg.objective.name)(cfg)
    if cfg.awp is not None:
        from .awp import AWP

        objective = AWP(objective, cfg)
    return objective


def prepare_model(cfg, spec, model):
    """The model ``cfg.objective`` trains: ``model`` itself unless the objective replaces it (``acl``, ``fare``)."""
    return OBJECTIVES.get(cfg.objective.name).prepare_model(cfg, spec, model)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "ObjectiveOutput", "attack_phase", "build_objective",
           "plain_step", "prepare_model"]
