"""The attack registry and what each registered attack declares.

Every attack is a pure function ``fn(model, x, y, *, eps, norm, generator, <its own knobs>)``. Its
keyword-only parameters are its contract: callers pass exactly those (an unknown keyword is a
TypeError, never silently dropped), and ``attack_parameters`` lets specs check arguments up front.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from ..core.registry import Registry
from .core import fgsm, fgsm_rs, nfgsm, no_attack, pgd
from .external import apgd_ce, apgd_ce_dlr, apgd_dlr, autoattack, square

ATTACKS: Registry[Callable[..., torch.Tensor]] = Registry("attack")
ATTACKS.register("fgsm")(fgsm)
ATTACKS.register("fgsm_rs")(fgsm_rs)
ATTACKS.register("nfgsm")(nfgsm)  # N-FGSM: noise 2 eps, step eps, no projection (de Jorge et al. 2022)
ATTACKS.register("pgd")(pgd)
ATTACKS.register("none")(no_attack)
# Evaluation-only attacks through torchattacks (AutoAttack and its parts; Square is the black-box check).
ATTACKS.register("autoattack")(autoattack)
ATTACKS.register("apgd-ce")(apgd_ce)
ATTACKS.register("apgd-dlr")(apgd_dlr)
ATTACKS.register("apgd-ce-dlr")(apgd_ce_dlr)  # the in-training evaluation's headline attack
ATTACKS.register("square")(square)


@functools.lru_cache(maxsize=None)
def _keywords(fn: Callable[..., Any]) -> dict[str, Any]:
    sig = inspect.signature(fn)
    return {name: p.default for name, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def attack_parameters(name: str) -> dict[str, Any]:
    """Keyword parameters of attack ``name`` -> their defaults (``inspect.Parameter.empty`` if required).

    An unknown name is a ConfigError listing the registered attacks.
    """
    return dict(_keywords(ATTACKS.get(name)))
