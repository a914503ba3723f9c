"""Optimizer factory (from the DeepSpeed JSON), LR scaling and schedules.

``specs`` (the facts a JSON is checked against) imports no torch; the rest is loaded on first use, so
``from dat_ds.optim.specs import ...`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .specs import SPECS, OptimizerSpec, check_optimizer_params, optimizer_spec

_LAZY = {"OPTIMIZERS": "factory", "OptimizerEntry": "factory", "build_optimizer": "factory", "param_groups": "factory",
         "build_scheduler": "schedule", "lr_multiplier": "schedule", "lr_scale": "schedule"}

__all__ = ["OPTIMIZERS", "SPECS", "OptimizerEntry", "OptimizerSpec", "build_optimizer", "build_scheduler",
           "check_optimizer_params", "lr_multiplier", "lr_scale", "optimizer_spec", "param_groups"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
