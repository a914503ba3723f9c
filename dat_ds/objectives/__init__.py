"""Training objectives, registered by name; each returns ``{"loss": ..., <metrics>}``."""

from . import supervised  # noqa: F401  (registers madry, dat, clean)
from .base import OBJECTIVES, Objective, ObjectiveContext


def build_objective(cfg) -> Objective:
    return OBJECTIVES.get(cfg.objective.name)(cfg)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "build_objective"]
