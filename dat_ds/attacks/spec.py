"""``AttackSpec``: one registered attack with its arguments, checked against what the attack declares.

A spec names an attack and the values of the knobs it sets; a field left at its neutral value
(``steps=None``, ``restarts=1``, ``step_size=None``, ``norm="linf"``, ``loss="ce"``) sets nothing and the
attack's own default applies (its step size is ``default_step_size``). Building a spec checks each set
value against the attack's keyword signature, so an argument the attack does not take is a ConfigError
that names the attack and what it takes, raised before any model runs; ``run`` then passes exactly the
parameters the attack declares.

The run config's attack sections are shared by every attack kind: their ``steps`` are PGD's, and
attacks without steps ignore them; ``restarts``, ``step_size`` or ``noise_multiplier`` (N-FGSM's) set
for an attack that has none are refused like any other argument. ``init_delta`` (a start perturbation,
ATTA's reuse) and ``on_stage`` (AutoAttack's per-stage report) are runtime state, never spec values: only
``attack_from_config`` passes the first, and ``run``'s caller (``evaluate``) the second.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from ..core.config import AttackConfig, RunConfig
from ..core.errors import ConfigError
from ..core.fields import Float, Positive, Radius, Section, Str, fix
from .core import LossFn, SuccessFn, default_step_size
from .external import StageHook
from .geometry import GEOMETRIES
from .losses import ATTACK_LOSSES, ce_loss, misclassified
from .registry import ATTACKS, attack_parameters

# Spec field -> the attack parameter it sets, and the field's neutral value (sets nothing).
_FIELDS: dict[str, tuple[str, Any]] = {
    "steps": ("steps", None), "restarts": ("restarts", 1), "step_size": ("step_size", None),
    "norm": ("norm", "linf"), "loss": ("loss_fn", "ce"),
}
_SUPPLIED = ("eps", "generator")  # every attack takes these; the spec and the caller supply them
_RUNTIME = ("init_delta", "on_stage")  # passed by the caller per batch, never set by a spec
_DISPLAY = {"fgsm": "FGSM", "fgsm_rs": "FGSM-RS", "nfgsm": "N-FGSM", "autoattack": "AutoAttack", "apgd-ce": "APGD-CE",
            "apgd-dlr": "APGD-DLR", "apgd-ce-dlr": "APGD-CE+DLR", "square": "Square", "none": "clean"}


def takes(attack: str) -> list[str]:
    """What a spec may set for ``attack``: spec fields (``loss``, not ``loss_fn``) and extra keywords."""
    by_param = {param: name for name, (param, _) in _FIELDS.items()}
    return ["eps", *(by_param.get(p, p) for p in attack_parameters(attack) if p not in _SUPPLIED + _RUNTIME)]


def _refuse(attack: str, what: str) -> ConfigError:
    return ConfigError(f"attack {attack!r} does not take {what}; it takes {', '.join(takes(attack))}")


class AttackSpec(Section):
    """An attack and the knobs it sets, with the run config's field types (``core.fields``)."""

    title: ClassVar[str] = "the attack spec"

    attack: Str = "pgd"
    eps: Radius = Field(0.1, **fix("; eps is a radius"))
    steps: Positive | None = None  # None: the attack's default (``dat-ds eval`` passes 20 to PGD)
    restarts: Positive = 1  # worst case per example over this many random starts
    step_size: Float | None = Field(None, gt=0, **fix(" (or None for the standard step)"))  # None: default_step_size
    norm: Str = "linf"
    loss: Str = "ce"  # a registered attack loss (ATTACK_LOSSES)
    extra: dict[str, Any] = {}  # the attack's own keywords, e.g. {"n_queries": 1000}

    def __init__(self, *attack: str, **values: Any) -> None:
        """``AttackSpec("pgd", eps=0.1)``: the attack may come first, as in the registry's call."""
        super().__init__(**({"attack": attack[0]} if attack else {}), **values)

    @model_validator(mode="after")
    def _declared(self) -> AttackSpec:
        params = attack_parameters(self.attack)  # unknown attack: ConfigError listing the registered ones
        for name, (param, neutral) in _FIELDS.items():
            value = getattr(self, name)
            if value != neutral and param not in params:
                raise _refuse(self.attack, f"{name}={value!r}")
        for key in self.extra:
            if key not in params or key in _SUPPLIED + _RUNTIME or key in (p for p, _ in _FIELDS.values()):
                raise _refuse(self.attack, f"{key}={self.extra[key]!r} as an extra argument")
        ATTACK_LOSSES.get(self.loss)
        GEOMETRIES.get(self.norm)
        return self

    @property
    def label(self) -> str:
        """A short unique name, e.g. ``PGD-20@0.1``, ``PGD-20x5-L2-margin@0.5``, ``AutoAttack@0.03137``."""
        if self.attack == "pgd":
            steps = self.steps if self.steps is not None else attack_parameters("pgd")["steps"]
            name = f"PGD-{steps}"
        else:
            name = _DISPLAY.get(self.attack, self.attack) + ("" if self.steps is None else f"-{self.steps}")
        name += f"x{self.restarts}" if self.restarts > 1 else ""
        if self.step_size is not None:
            name += f"-a{self.step_size:.3g}"
        name += "" if self.norm == "linf" else f"-{self.norm.upper()}"
        name += "" if self.loss == "ce" else f"-{self.loss}"
        for key, value in sorted(self.extra.items()):
            name += f"-{key}{value}"
        return f"{name}@{self.eps:.4g}"

    @property
    def effective_step_size(self) -> float | None:
        """The step the attack takes: ``step_size``, else its standard one; None if it has no step size."""
        params = attack_parameters(self.attack)
        if self.step_size is not None or "step_size" not in params:
            return self.step_size
        steps = self.steps if self.steps is not None else params.get("steps", 1)
        return default_step_size(self.attack, self.eps, steps)

    def kwargs(self, generator: torch.Generator | None) -> dict[str, Any]:
        """The keyword arguments of the attack call: only parameters the attack declares."""
        out: dict[str, Any] = {"eps": self.eps, "generator": generator}
        for name, (param, neutral) in _FIELDS.items():
            value = getattr(self, name)
            if value != neutral:
                out[param] = ATTACK_LOSSES.get(value) if name == "loss" else value
        out.update(self.extra)
        return out

    @property
    def has_stages(self) -> bool:
        """Whether the attack runs in stages it can report (``on_stage``): AutoAttack's ensemble."""
        return "on_stage" in attack_parameters(self.attack)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None, *,
            on_stage: StageHook | None = None) -> torch.Tensor:
        """``x_adv`` for ``x``; ``on_stage`` goes to an attack that ``has_stages`` (a single attack has none)."""
        kwargs = self.kwargs(generator)
        if on_stage is not None and self.has_stages:
            kwargs["on_stage"] = on_stage
        return ATTACKS.get(self.attack)(model, x, y, **kwargs)


def _from_section(section: str, name_key: str, attack: str, eps: float, norm: str, *, steps: int, restarts: int,
                  step_size: float | None, noise_multiplier: float | None = None) -> AttackSpec:
    params = attack_parameters(attack)
    for key, value, neutral in (("restarts", restarts, 1), ("step_size", step_size, None),
                                ("noise_multiplier", noise_multiplier, None)):
        if value != neutral and key not in params:
            raise ConfigError(f"{section}.{key}={value} does not apply to {name_key}={attack}; "
                              f"{attack!r} takes {', '.join(takes(attack))}")
    extra = {} if noise_multiplier is None else {"noise_multiplier": noise_multiplier}
    return AttackSpec(attack, eps=eps, steps=steps if "steps" in params else None, restarts=restarts,
                      step_size=step_size, norm=norm, extra=extra)


def training_spec(cfg: AttackConfig) -> AttackSpec:
    """The training attack of a run config's ``attack`` section."""
    return _from_section("attack", "attack.name", cfg.name, cfg.eps, cfg.norm, steps=cfg.steps,
                         restarts=cfg.restarts, step_size=cfg.step_size, noise_multiplier=cfg.noise_multiplier)


def eval_spec(cfg: RunConfig) -> AttackSpec:
    """The attack of the in-training robust evaluation (``eval`` section; eps and norm default to training's)."""
    e = cfg.eval
    return _from_section("eval", "eval.attack", e.attack, e.eps if e.eps is not None else cfg.attack.eps,
                         cfg.attack.norm, steps=e.steps, restarts=e.restarts, step_size=e.step_size)


@functools.lru_cache(maxsize=32)
def _cached_training_spec(cfg: AttackConfig) -> AttackSpec:
    return training_spec(cfg)


def attack_from_config(cfg: AttackConfig, model: nn.Module, x: torch.Tensor, y, *,
                       generator: torch.Generator | None = None, loss_fn: LossFn = ce_loss,
                       success_fn: SuccessFn | None = misclassified,
                       init_delta: torch.Tensor | None = None) -> torch.Tensor:
    """Run the configured training attack. The objective's ``loss_fn``/``success_fn`` (TRADES' KL, the
    contrastive loss) go to the attacks that take them; ``none`` ignores both. ``init_delta`` (the
    example's stored perturbation, ``attack.reuse``) starts the attack; an attack without a start is an error."""
    spec = _cached_training_spec(cfg)
    kwargs = spec.kwargs(generator)
    params = attack_parameters(spec.attack)
    if init_delta is not None:
        if "init_delta" not in params:
            raise ConfigError(f"attack {spec.attack!r} takes no start perturbation, so attack.reuse cannot apply; "
                              "use pgd, fgsm_rs or fgsm")
        kwargs["init_delta"] = init_delta
    if "loss_fn" in params:
        kwargs["loss_fn"] = loss_fn
    if "success_fn" in params:
        kwargs["success_fn"] = success_fn
    return ATTACKS.get(spec.attack)(model, x, y, **kwargs)
