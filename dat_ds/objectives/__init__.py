"""Training objectives, registered by name; each returns ``{"loss": ..., <metrics>}``."""

from . import contrastive, free, mart, supervised, trades  # noqa: F401  (register acl, free, mart, madry, dat, clean, trades)
from .base import OBJECTIVES, Objective, ObjectiveContext


def build_objective(cfg) -> Objective:
    return OBJECTIVES.get(cfg.objective.name)(cfg)


def prepare_model(cfg, spec, model):
    """The model the objective trains: ``model`` itself, unless the objective wraps or replaces it.

    An objective class may define ``prepare_model(cfg, spec, model)``; ``acl`` uses it to train an
    encoder + projection head instead of a classifier.
    """
    hook = getattr(OBJECTIVES.get(cfg.objective.name), "prepare_model", None)
    return model if hook is None else hook(cfg, spec, model)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "build_objective", "prepare_model"]
