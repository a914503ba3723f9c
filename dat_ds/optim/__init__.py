"""Optimizer factory (from the DeepSpeed JSON), LR scaling and schedules."""

from .factory import OPTIMIZERS, OptimizerEntry, build_optimizer, check_optimizer_params, param_groups
from .schedule import build_scheduler, lr_multiplier, lr_scale

__all__ = ["OPTIMIZERS", "OptimizerEntry", "build_optimizer", "build_scheduler", "check_optimizer_params",
           "lr_multiplier", "lr_scale", "param_groups"]
