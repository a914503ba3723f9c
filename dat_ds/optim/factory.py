"""Optimizers from the DeepSpeed JSON's ``"optimizer"`` section: name -> builder.

DeepSpeed 0.19 builds Adam through fused kernels that do not exist on every device, has no CPU LAMB
kernel and no longer ships the 1-bit optimizers, so dat-ds builds every optimizer itself from the same
JSON (``{"type": ..., "params": {...}}``) and hands it to ``deepspeed.initialize`` as a client
optimizer. What each one accepts is frozen data in ``specs.py`` (torch-free, so the CLI can check a
JSON without torch); anything else is a ``ConfigError``, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..core.registry import Registry
from .specs import SPECS, OptimizerSpec, check_optimizer_params, optimizer_spec


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable[..., torch.optim.Optimizer]
    spec: OptimizerSpec

    @property
    def compresses(self) -> bool:
        return self.spec.compresses


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")


def _adam(params, *, adam_w_mode: bool = False, **kw):
    return torch.optim.AdamW(params, **kw) if adam_w_mode else torch.optim.Adam(params, **kw)


def _timm_lamb(params, **kw):
    from timm.optim import Lamb

    return Lamb(params, **kw)


def _timm_lars(params, **kw):
    from timm.optim import Lars

    return Lars(params, **kw)


def _onebit(cls_name: str):
    def build(params, **kw):
        from . import onebit

        return getattr(onebit, cls_name)(params, **kw)

    return build


BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": _adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "lamb": _timm_lamb, "lars": _timm_lars,
    "onebitadam": _onebit("OneBitAdam"), "zerooneadam": _onebit("ZeroOneAdam"), "onebitlamb": _onebit("OneBitLamb"),
}
for _name, _build in BUILDERS.items():
    OPTIMIZERS.register(_name)(OptimizerEntry(_build, SPECS[_name]))


def optimizer_entry(section: dict[str, Any]) -> tuple[str, OptimizerEntry]:
    name, _ = optimizer_spec(section)
    return name, OPTIMIZERS.get(name)


def build_optimizer(section: dict[str, Any], params: Iterable, *, lr_scale: float = 1.0, **runtime) -> torch.optim.Optimizer:
    """Build the optimizer named by a DeepSpeed JSON optimizer section.

    ``runtime`` carries objects the compressing optimizers need (e.g. the process group); plain
    optimizers ignore it.
    """
    name, spec = check_optimizer_params(section)
    kwargs = {k: v for k, v in (section.get("params") or {}).items() if k not in spec.ignored}
    kwargs = {spec.renames.get(k, k): v for k, v in kwargs.items()}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    kwargs["lr"] = float(kwargs.get("lr", 1e-3)) * lr_scale
    if spec.compresses:
        kwargs.update(runtime)
    return BUILDERS[name](params, **kwargs)


def param_groups(model: torch.nn.Module, weight_decay: float | None) -> list[dict[str, Any]]:
    """No weight decay on biases and norm weights (1-D tensors), as timm and DAT do."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    if not weight_decay:
        return [{"params": decay + no_decay}]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
