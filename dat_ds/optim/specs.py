"""Optimizer facts as frozen data, next to no code: what the DeepSpeed JSON's ``"optimizer"`` may say.

Validating a DeepSpeed JSON needs these facts but no optimizer, so this module imports no torch: the
CLI checks a JSON (``dat_ds.runtime.ds_config``) in a fraction of a second. ``factory.py`` maps the
same names to builders; a test keeps the two key sets equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ..core.errors import ConfigError


@dataclass(frozen=True)
class OptimizerSpec:
    allowed: frozenset[str]  # constructor parameters the JSON may set
    compresses: bool = False  # does its own (compressed) gradient communication
    renames: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # JSON name -> constructor name
    ignored: frozenset[str] = frozenset()  # accepted for DeepSpeed 0.18 compatibility, no effect here
    # Passed to the constructor unless the JSON says otherwise, so that no library default decides what a
    # JSON means (timm's Lamb would decay every tensor by 0.01 and clip the gradient norm at 1.0).
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # JSON keys that would change the algorithm behind the JSON's back: key -> what to write instead.
    refused: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Layer-wise trust ratio (LAMB, LARS): on for every weight tensor whatever its decay, off (and no
    # decay) for biases and norm weights, the 1-D tensors, as in the LAMB paper and DAT.
    layerwise: bool = False


_ADAM_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"})
# Accepted by DeepSpeed's Adam section; meaningless for a torch optimizer but harmless.
_DS_ADAM_EXTRAS = frozenset({"torch_adam", "adam_w_mode", "bias_correction", "fused"})
_COMM_KEYS = frozenset({"cuda_aware", "comm_backend_name"})
# DeepSpeed 0.18 accepted these for its 1-bit optimizers; they have no effect there or here.
_ONEBIT_IGNORED = frozenset({"bias_correction", "eps_inside_sqrt", "max_grad_norm", "amsgrad"})

_LAYERWISE_REFUSED = MappingProxyType({
    "max_grad_norm": 'the optimizer never clips; clip the global gradient norm with DeepSpeed\'s top-level '
                     '"gradient_clipping" (0 disables)',
    "always_adapt": "the trust ratio is always on for weight tensors and off for biases and norm weights "
                    "(1-D tensors); drop the key",
})

SPECS: Mapping[str, OptimizerSpec] = MappingProxyType({
    "adam": OptimizerSpec(_ADAM_KEYS | {"adam_w_mode"}, ignored=_DS_ADAM_EXTRAS - {"adam_w_mode"}),
    "adamw": OptimizerSpec(_ADAM_KEYS, ignored=_DS_ADAM_EXTRAS),
    "sgd": OptimizerSpec(frozenset({"lr", "momentum", "weight_decay", "nesterov", "dampening"})),
    # timm's Lamb/Lars run on every device (DeepSpeed's fused LAMB is CUDA-only).
    "lamb": OptimizerSpec(frozenset({"lr", "betas", "eps", "weight_decay", "trust_clip", "bias_correction"}),
                          ignored=frozenset({"max_coeff", "min_coeff"}), layerwise=True, refused=_LAYERWISE_REFUSED,
                          defaults=MappingProxyType({"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0,
                                                     "bias_correction": True, "trust_clip": False,
                                                     "max_grad_norm": None})),
    "lars": OptimizerSpec(frozenset({"lr", "momentum", "weight_decay", "dampening", "nesterov", "trust_coeff",
                                     "trust_clip", "eps"}), layerwise=True, refused=_LAYERWISE_REFUSED,
                          defaults=MappingProxyType({"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                                                     "nesterov": False, "trust_coeff": 0.001, "eps": 1e-8,
                                                     "trust_clip": False})),
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


# Ranges of the parameters several optimizers share: (low, low inclusive, high, high inclusive).
# A value outside them makes the optimizer diverge or raise mid-run (torch checks some only at step 1).
PARAM_RANGES: Mapping[str, tuple[float, bool, float, bool]] = MappingProxyType({
    "lr": (0.0, False, math.inf, False),
    "eps": (0.0, False, math.inf, False),
    "weight_decay": (0.0, True, math.inf, False),
    "momentum": (0.0, True, 1.0, False),
    "dampening": (0.0, True, 1.0, True),
    "max_grad_norm": (0.0, True, math.inf, False),
})
BETA_RANGE = (0.0, True, 1.0, False)  # each of "betas"
BOOL_PARAMS = frozenset({"amsgrad", "nesterov", "adam_w_mode", "bias_correction", "fused", "torch_adam", "cuda_aware",
                         "trust_clip", "always_adapt", "eps_inside_sqrt"})
STRING_PARAMS = frozenset({"comm_backend_name"})


def _interval(low: float, low_in: bool, high: float, high_in: bool) -> str:
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _inside(value: float, low: float, low_in: bool, high: float, high_in: bool) -> bool:
    return (value >= low if low_in else value > low) and (value <= high if high_in else value < high)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_param_values(type_name: str, params: dict[str, Any]) -> None:
    """Types and ranges: numbers finite, flags true/false, lr > 0, betas in [0, 1), eps > 0, ..."""
    where = f"optimizer {type_name!r}"
    for key, value in params.items():
        if key in BOOL_PARAMS:
            if not isinstance(value, bool):
                raise ConfigError(f"{where} {key}={value!r} must be true or false")
        elif key in STRING_PARAMS:
            if not isinstance(value, str):
                raise ConfigError(f"{where} {key}={value!r} must be a string")
        elif key == "betas":
            if not (isinstance(value, list) and len(value) == 2 and all(map(_is_number, value))):
                raise ConfigError(f"{where} betas={value!r} must be a list of two numbers, e.g. [0.9, 0.999]")
            for beta in value:
                if not _inside(beta, *BETA_RANGE):
                    raise ConfigError(f"{where} betas={value!r}: each beta must be {_interval(*BETA_RANGE)}")
        elif not _is_number(value):
            raise ConfigError(f"{where} {key}={value!r} must be a number")
        elif not math.isfinite(value):
            raise ConfigError(f"{where} {key}={value!r} must be a finite number")
        elif key in PARAM_RANGES and not _inside(value, *PARAM_RANGES[key]):
            raise ConfigError(f"{where} {key}={value!r} must be {_interval(*PARAM_RANGES[key])}")


# DeepSpeed's own LR schedulers (deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES) and their parameters
# (the constructor's, less the optimizer); a test keeps both equal to the installed DeepSpeed's.
DEEPSPEED_SCHEDULERS: Mapping[str, frozenset[str]] = MappingProxyType({
    "LRRangeTest": frozenset({"lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate",
                              "lr_range_test_staircase", "last_batch_iteration"}),
    "OneCycle": frozenset({"cycle_min_lr", "cycle_max_lr", "decay_lr_rate", "cycle_first_step_size",
                           "cycle_second_step_size", "cycle_first_stair_count", "cycle_second_stair_count",
                           "decay_step_size", "cycle_momentum", "cycle_min_mom", "cycle_max_mom", "decay_mom_rate",
                           "last_batch_iteration"}),
    "WarmupLR": frozenset({"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                           "last_batch_iteration"}),
    "WarmupDecayLR": frozenset({"total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps",
                                "warmup_type", "last_batch_iteration"}),
    "WarmupCosineLR": frozenset({"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio",
                                 "warmup_type", "last_batch_iteration"}),
})
# DeepSpeed falls back to torch.optim.lr_scheduler for other names; these are the ones a JSON can build
# (no callables, no nested schedulers, no metric passed to step()).
TORCH_SCHEDULERS = ("ConstantLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "ExponentialLR",
                    "LinearLR", "MultiStepLR", "OneCycleLR", "PolynomialLR", "StepLR")


def check_scheduler(section: Any) -> None:
    """The JSON's ``"scheduler"``: a type DeepSpeed can build (case matters, as in DeepSpeed) and its params."""
    example = '{"type": "WarmupLR", "params": {"warmup_num_steps": 100}}'
    if not isinstance(section, dict):
        raise ConfigError(f'DeepSpeed config "scheduler" must be an object like {example}')
    unknown_top = sorted(set(section) - {"type", "params"})
    if unknown_top:
        raise ConfigError(f'unknown key {unknown_top[0]!r} in DeepSpeed config "scheduler"; allowed: type, params')
    kind = section.get("type")
    if kind not in DEEPSPEED_SCHEDULERS and kind not in TORCH_SCHEDULERS:
        raise ConfigError(f"unknown scheduler type {kind!r} in the DeepSpeed config; choose one of DeepSpeed's "
                          f"{', '.join(DEEPSPEED_SCHEDULERS)} or torch's {', '.join(TORCH_SCHEDULERS)} (case matters)")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError('DeepSpeed config "scheduler.params" must be an object')
    if kind in DEEPSPEED_SCHEDULERS:
        allowed = DEEPSPEED_SCHEDULERS[kind]
        bad = sorted(set(params) - allowed)
        if bad:
            raise ConfigError(f"unknown parameter {bad[0]!r} for scheduler {kind!r}; allowed: {', '.join(sorted(allowed))}")
    for key, value in params.items():
        if _is_number(value) and not math.isfinite(value):
            raise ConfigError(f"scheduler {kind!r} {key}={value!r} must be a finite number")


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
    """Every parameter is known to the optimizer, of its type and in its range; returns ``optimizer_spec(section)``."""
    name, spec = optimizer_spec(section)
    params = section.get("params", {}) or {}
    if not isinstance(params, dict):
        raise ConfigError('DeepSpeed config "optimizer.params" must be a mapping')
    refused = sorted(set(params) & set(spec.refused))
    if refused:
        raise ConfigError(f"optimizer {section['type']!r} does not take {refused[0]!r}: {spec.refused[refused[0]]}")
    unknown = sorted(set(params) - spec.allowed - spec.ignored)
    if unknown:
        raise ConfigError(
            f"unknown parameter {unknown[0]!r} for optimizer {section['type']!r}; "
            f"allowed: {', '.join(sorted(spec.allowed | spec.ignored))}"
        )
    check_param_values(str(section["type"]), params)
    return name, spec
