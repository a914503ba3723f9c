"""Optimizers from the DeepSpeed JSON's ``"optimizer"`` section: name -> builder.

DeepSpeed 0.19 builds Adam through fused kernels that do not exist on every device, has no CPU LAMB
kernel and no longer ships the 1-bit optimizers, so dat-ds builds every optimizer itself from the same
JSON (``{"type": ..., "params": {...}}``) and hands it to ``deepspeed.initialize`` as a client
optimizer. What each one accepts is frozen data in ``specs.py`` (torch-free, so the CLI can check a
JSON without torch); anything else is a ``ConfigError``, so a typo never silently falls back to a default.
LAMB and LARS come from timm, whose defaults would change what a JSON means (no trust ratio at
``weight_decay: 0``, decay 0.01 when it is absent, gradient clipping at norm 1): every setting is passed
explicitly (``OptimizerSpec.defaults``), the 1-D tensors get their own group, and the result is logged once.
"""

from __future__ import annotations

import logging
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


log = logging.getLogger(__name__)

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

    ``params`` are tensors or param groups (``param_groups(model, ...)``). ``runtime`` carries objects the
    compressing optimizers need (e.g. the process group); plain optimizers ignore it.
    """
    name, spec = check_optimizer_params(section)
    given = section.get("params") or {}
    kwargs = {k: v for k, v in given.items() if k not in spec.ignored}
    kwargs = {**spec.defaults, **{spec.renames.get(k, k): v for k, v in kwargs.items()}}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    kwargs["lr"] = float(kwargs.get("lr", 1e-3)) * lr_scale
    if spec.compresses:
        kwargs.update(runtime)
    if spec.layerwise:
        params = _layerwise_groups(_as_groups(params))
        _log_layerwise(str(section["type"]), kwargs, params,
                       defaulted=sorted(set(spec.defaults) - set(given) - set(spec.refused)),
                       ignored=sorted(set(given) & spec.ignored))
    return BUILDERS[name](params, **kwargs)


def _as_groups(params: Iterable) -> list[dict[str, Any]]:
    params = list(params)
    if params and isinstance(params[0], dict):
        return [dict(group) for group in params]
    return [{"params": params}]


def _layerwise_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group split in two: weight tensors with the trust ratio on whatever their decay (timm applies
    it only where weight_decay != 0 unless ``always_adapt``), then biases and norm weights (1-D) with
    neither trust ratio nor decay."""
    out = []
    for group in groups:
        tensors = list(group["params"])
        weights = [p for p in tensors if p.ndim > 1]
        flat = [p for p in tensors if p.ndim <= 1]
        if weights:
            out.append({**group, "params": weights, "always_adapt": True})
        if flat:
            out.append({**group, "params": flat, "weight_decay": 0.0, "always_adapt": False})
    return out


def _log_layerwise(type_name: str, kwargs: dict[str, Any], groups: list[dict[str, Any]], *, defaulted: list[str],
                   ignored: list[str]) -> None:
    """What the JSON means, once per build (the dat_ds logger shows rank 0 only)."""
    n_weights = sum(len(g["params"]) for g in groups if g["always_adapt"])
    n_flat = sum(len(g["params"]) for g in groups if not g["always_adapt"])
    decays = sorted({float(g.get("weight_decay", kwargs["weight_decay"])) for g in groups if g["always_adapt"]})
    settings = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()) if k not in ("max_grad_norm", "lr"))
    log.info("%s (timm): trust ratio and weight decay %s on %d weight tensors; biases and norm weights (%d 1-D "
             "tensors): neither; no gradient clipping in the optimizer (DeepSpeed's gradient_clipping only); "
             "lr=%g, %s%s", type_name, "/".join(f"{d:g}" for d in decays) or "0", n_weights, n_flat,
             kwargs["lr"], settings, f" (not in the JSON, ours: {', '.join(defaulted)})" if defaulted else "")
    if ignored:
        log.warning("%s: %s accepted for DeepSpeed compatibility but without effect (timm's %s does not clamp "
                    "the trust ratio)", type_name, ", ".join(ignored), type_name)


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
