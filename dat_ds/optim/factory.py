"""Optimizers from the DeepSpeed JSON's ``"optimizer"`` section.

DeepSpeed 0.19 builds Adam through fused kernels that do not exist on every device, has no CPU LAMB
kernel and no longer ships the 1-bit optimizers, so dat-ds builds every optimizer itself from the same
JSON (``{"type": ..., "params": {...}}``) and hands it to ``deepspeed.initialize`` as a client
optimizer. Each entry lists the parameter names it accepts; anything else is a ``ConfigError``, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..core.errors import ConfigError
from ..core.registry import Registry


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable[..., torch.optim.Optimizer]
    allowed: frozenset[str]
    compresses: bool = False  # does its own (compressed) gradient communication
    renames: dict[str, str] = field(default_factory=dict)  # DeepSpeed JSON name -> constructor name
    ignored: frozenset[str] = frozenset()  # accepted for DeepSpeed 0.18 compatibility, no effect here


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer")

_ADAM_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"})
# Accepted by DeepSpeed's Adam section; meaningless for a torch optimizer but harmless.
_DS_ADAM_EXTRAS = frozenset({"torch_adam", "adam_w_mode", "bias_correction", "fused"})


def _adam(params, *, adam_w_mode: bool = False, **kw):
    return torch.optim.AdamW(params, **kw) if adam_w_mode else torch.optim.Adam(params, **kw)


OPTIMIZERS.register("adam")(OptimizerEntry(lambda p, **kw: _adam(p, **kw), _ADAM_KEYS | {"adam_w_mode"},
                                           ignored=_DS_ADAM_EXTRAS - {"adam_w_mode"}))
OPTIMIZERS.register("adamw")(OptimizerEntry(torch.optim.AdamW, _ADAM_KEYS, ignored=_DS_ADAM_EXTRAS))
OPTIMIZERS.register("sgd")(OptimizerEntry(torch.optim.SGD, frozenset({"lr", "momentum", "weight_decay", "nesterov", "dampening"})))


def _timm_lamb(params, **kw):
    from timm.optim import Lamb

    return Lamb(params, **kw)


def _timm_lars(params, **kw):
    from timm.optim import Lars

    return Lars(params, **kw)


# timm's Lamb/Lars run on every device (DeepSpeed's fused LAMB is CUDA-only).
OPTIMIZERS.register("lamb")(OptimizerEntry(
    _timm_lamb, frozenset({"lr", "betas", "eps", "weight_decay", "max_grad_norm", "trust_clip", "always_adapt",
                           "max_coeff", "min_coeff", "bias_correction"}),
    ignored=frozenset({"max_coeff", "min_coeff"})))
OPTIMIZERS.register("lars")(OptimizerEntry(
    _timm_lars, frozenset({"lr", "momentum", "weight_decay", "dampening", "nesterov", "trust_coeff", "trust_clip",
                           "always_adapt", "eps"})))


# Ours (dat_ds/optim/onebit.py): they average gradients themselves, compressed; DeepSpeed 0.18 names.
_COMM_KEYS = frozenset({"cuda_aware", "comm_backend_name"})
# DeepSpeed 0.18 accepted these for its 1-bit optimizers; they have no effect there or here.
_ONEBIT_IGNORED = frozenset({"bias_correction", "eps_inside_sqrt", "max_grad_norm", "amsgrad"})


def _onebit(cls_name: str):
    def build(params, **kw):
        from . import onebit

        return getattr(onebit, cls_name)(params, **kw)

    return build


OPTIMIZERS.register("onebitadam")(OptimizerEntry(
    _onebit("OneBitAdam"), _ADAM_KEYS - {"amsgrad"} | {"freeze_step"} | _COMM_KEYS, compresses=True,
    ignored=_ONEBIT_IGNORED))
OPTIMIZERS.register("zerooneadam")(OptimizerEntry(
    _onebit("ZeroOneAdam"), _ADAM_KEYS - {"amsgrad"} | {"var_freeze_step", "var_update_scaler", "local_step_scaler",
                                                       "local_step_clipper"} | _COMM_KEYS,
    compresses=True, ignored=_ONEBIT_IGNORED))
OPTIMIZERS.register("onebitlamb")(OptimizerEntry(
    _onebit("OneBitLamb"), _ADAM_KEYS - {"amsgrad"} | {"freeze_step", "max_coeff", "min_coeff", "coeff_beta", "factor_max",
                                                      "factor_min", "factor_threshold"} | _COMM_KEYS,
    compresses=True, ignored=_ONEBIT_IGNORED))


def _normalise(type_name: str) -> str:
    return type_name.replace("_", "").replace("-", "").lower()


def optimizer_entry(section: dict[str, Any]) -> tuple[str, OptimizerEntry]:
    if "type" not in section:
        raise ConfigError('DeepSpeed config "optimizer" needs a "type", e.g. {"type": "AdamW", "params": {"lr": 1e-3}}')
    unknown_top = sorted(set(section) - {"type", "params"})
    if unknown_top:
        raise ConfigError(f'unknown key {unknown_top[0]!r} in DeepSpeed config "optimizer"; allowed: type, params')
    name = _normalise(str(section["type"]))
    aliases = {_normalise(n): n for n in OPTIMIZERS.names()}
    if name not in aliases:
        raise ConfigError(
            f"unknown optimizer type {section['type']!r} in the DeepSpeed config; choose one of: "
            f"{', '.join(OPTIMIZERS.names())} (case-insensitive)"
        )
    return aliases[name], OPTIMIZERS.get(aliases[name])


def check_optimizer_params(section: dict[str, Any]) -> None:
    name, entry = optimizer_entry(section)
    params = section.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ConfigError('DeepSpeed config "optimizer.params" must be a mapping')
    unknown = sorted(set(params) - entry.allowed - entry.ignored)
    if unknown:
        raise ConfigError(
            f"unknown parameter {unknown[0]!r} for optimizer {section['type']!r}; allowed: {', '.join(sorted(entry.allowed | entry.ignored))}"
        )
    if "lr" in params and not (isinstance(params["lr"], (int, float)) and params["lr"] > 0):
        raise ConfigError(f"optimizer lr={params['lr']!r} must be a positive number")


def build_optimizer(section: dict[str, Any], params: Iterable, *, lr_scale: float = 1.0, **runtime) -> torch.optim.Optimizer:
    """Build the optimizer named by a DeepSpeed JSON optimizer section.

    ``runtime`` carries objects the compressing optimizers need (e.g. the process group); plain
    optimizers ignore it.
    """
    check_optimizer_params(section)
    name, entry = optimizer_entry(section)
    kwargs = {k: v for k, v in (section.get("params") or {}).items() if k not in entry.ignored}
    kwargs = {entry.renames.get(k, k): v for k, v in kwargs.items()}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    kwargs["lr"] = float(kwargs.get("lr", 1e-3)) * lr_scale
    if entry.compresses:
        kwargs.update(runtime)
    return entry.build(params, **kwargs)


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
