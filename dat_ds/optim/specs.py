"""Optimizer facts as frozen data, next to no code: what the DeepSpeed JSON's ``"optimizer"`` may say.

Validating a DeepSpeed JSON needs these facts but no optimizer, so this module imports no torch: the
CLI checks a JSON (``dat_ds.runtime.ds_config``) in a fraction of a second. ``factory.py`` maps the
same names to builders; a test keeps the two key sets equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ..core import names
from ..core.errors import ConfigError


@dataclass(frozen=True)
class OptimizerSpec:
    allowed: frozenset[str]  # constructor parameters the JSON may set
    compresses: bool = False  # does its own (compressed) gradient communication
    renames: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # JSON name -> constructor name
    ignored: frozenset[str] = frozenset()  # accepted for DeepSpeed 0.18 compatibility, no effect here


_ADAM_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"})
# Accepted by DeepSpeed's Adam section; meaningless for a torch optimizer but harmless.
_DS_ADAM_EXTRAS = frozenset({"torch_adam", "adam_w_mode", "bias_correction", "fused"})
_COMM_KEYS = frozenset({"cuda_aware", "comm_backend_name"})
# DeepSpeed 0.18 accepted these for its 1-bit optimizers; they have no effect there or here.
_ONEBIT_IGNORED = frozenset({"bias_correction", "eps_inside_sqrt", "max_grad_norm", "amsgrad"})

SPECS: Mapping[str, OptimizerSpec] = MappingProxyType({
    "adam": OptimizerSpec(_ADAM_KEYS | {"adam_w_mode"}, ignored=_DS_ADAM_EXTRAS - {"adam_w_mode"}),
    "adamw": OptimizerSpec(_ADAM_KEYS, ignored=_DS_ADAM_EXTRAS),
    "sgd": OptimizerSpec(frozenset({"lr", "momentum", "weight_decay", "nesterov", "dampening"})),
    # timm's Lamb/Lars run on every device (DeepSpeed's fused LAMB is CUDA-only).
    "lamb": OptimizerSpec(frozenset({"lr", "betas", "eps", "weight_decay", "max_grad_norm", "trust_clip", "always_adapt",
                                     "max_coeff", "min_coeff", "bias_correction"}),
                          ignored=frozenset({"max_coeff", "min_coeff"})),
    "lars": OptimizerSpec(frozenset({"lr", "momentum", "weight_decay", "dampening", "nesterov", "trust_coeff",
                                     "trust_clip", "always_adapt", "eps"})),
    # Ours (dat_ds/optim/onebit.py): they average gradients themselves, compressed; DeepSpeed 0.18 names.
    "onebitadam": OptimizerSpec(_ADAM_KEYS - {"amsgrad"} | {"freeze_step"} | _COMM_KEYS, compresses=True,
                                ignored=_ONEBIT_IGNORED),
    "zerooneadam": OptimizerSpec(_ADAM_KEYS - {"amsgrad"} | {"var_freeze_step", "var_update_scaler", "local_step_scaler",
                                                             "local_step_clipper"} | _COMM_KEYS,
                                 compresses=True, ignored=_ONEBIT_IGNORED),
    "onebitlamb": OptimizerSpec(_ADAM_KEYS - {"amsgrad"} | {"freeze_step", "max_coeff", "min_coeff", "coeff_beta",
                                                            "factor_max", "factor_min", "factor_threshold"} | _COMM_KEYS,
                                compresses=True, ignored=_ONEBIT_IGNORED),
})


def _normalise(type_name: str) -> str:
    return type_name.replace("_", "").replace("-", "").lower()


def optimizer_spec(section: dict[str, Any]) -> tuple[str, OptimizerSpec]:
    """The registered name and facts of a JSON ``"optimizer"`` section (``"AdamW"`` -> ``adamw``)."""
    if not isinstance(section, dict):
        raise ConfigError('DeepSpeed config "optimizer" must be an object like {"type": "AdamW", "params": {"lr": 1e-3}}')
    if "type" not in section:
        raise ConfigError('DeepSpeed config "optimizer" needs a "type", e.g. {"type": "AdamW", "params": {"lr": 1e-3}}')
    unknown_top = sorted(set(section) - {"type", "params"})
    if unknown_top:
        raise ConfigError(f'unknown key {unknown_top[0]!r} in DeepSpeed config "optimizer"; allowed: type, params')
    name = _normalise(str(section["type"]))
    if name not in SPECS:
        raise ConfigError(
            f"unknown optimizer type {section['type']!r} in the DeepSpeed config; choose one of: "
            f"{', '.join(sorted(SPECS))} (case-insensitive)"
        )
    return name, SPECS[name]


def check_optimizer_params(section: dict[str, Any]) -> tuple[str, OptimizerSpec]:
    """Every parameter is known to the optimizer and lr is positive; returns ``optimizer_spec(section)``."""
    name, spec = optimizer_spec(section)
    params = section.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ConfigError('DeepSpeed config "optimizer.params" must be a mapping')
    unknown = sorted(set(params) - spec.allowed - spec.ignored)
    if unknown:
        raise ConfigError(
            f"unknown parameter {unknown[0]!r} for optimizer {section['type']!r}; "
            f"allowed: {', '.join(sorted(spec.allowed | spec.ignored))}"
        )
    if "lr" in params and not (isinstance(params["lr"], (int, float)) and not isinstance(params["lr"], bool)
                               and params["lr"] > 0):
        raise ConfigError(f"optimizer lr={params['lr']!r} must be a positive number")
    return name, spec
