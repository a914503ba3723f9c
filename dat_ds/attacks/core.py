"""FGSM, FGSM with random start, and PGD: pure keyword-only functions.

Contract shared by every attack:
- gradients are taken with ``torch.autograd.grad`` w.r.t. the input only; parameter ``.grad`` is never
  touched, so an attack can run between ``engine.backward`` and ``engine.step`` without harm;
- the model runs in eval mode (BatchNorm uses running statistics, dropout is off) and its train/eval
  flags are restored afterwards;
- inputs and outputs are images in [0, 1]; eps and step sizes are in the same pixel units;
- randomness comes only from the explicit ``generator``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .geometry import GEOMETRIES
from .losses import ce_loss, misclassified

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SuccessFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The standard step of each attack that takes one, the only place it is written down:
# PGD-k takes 2.5*eps/k (Madry et al. 2018: k steps walk 2.5 eps, so any point of the ball is in reach),
# FGSM-RS 1.25*eps from its random start (Wong et al. 2020), plain FGSM one step of eps.
_DEFAULT_STEPS: dict[str, Callable[[float, int], float]] = {
    "pgd": lambda eps, steps: 2.5 * eps / steps,
    "fgsm_rs": lambda eps, steps: 1.25 * eps,
    "fgsm": lambda eps, steps: eps,
}


def default_step_size(attack: str, eps: float, steps: int = 1) -> float:
    """The step size ``attack`` uses when none is given (``steps`` matters for PGD only)."""
    try:
        rule = _DEFAULT_STEPS[attack]
    except KeyError:
        raise ValueError(f"attack {attack!r} takes no step size; those that do: {', '.join(_DEFAULT_STEPS)}") from None
    return rule(eps, steps)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def _input_grad(model: nn.Module, x_adv: torch.Tensor, y, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(x_adv)
        loss = loss_fn(out, y)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return grad, loss.detach()


@torch.no_grad()
def _score(model: nn.Module, x_adv: torch.Tensor, y, loss_fn: LossFn, success_fn: SuccessFn | None):
    out = model(x_adv)
    loss = loss_fn(out, y).float()
    if success_fn is None:
        return loss
    # Successful examples always beat unsuccessful ones; ties broken by loss.
    return loss + success_fn(out, y).float() * 1e6


def fgsm(model: nn.Module, x: torch.Tensor, y, *, eps: float, step_size: float | None = None, norm: str = "linf",
         loss_fn: LossFn = ce_loss, generator: torch.Generator | None = None) -> torch.Tensor:
    """One gradient step of size eps from the clean point (Goodfellow et al.; signed for L-inf, normalised for L2).

    Deterministic: ``generator`` is accepted so every attack shares ``(model, x, y, *, eps, norm, generator)``.
    """
    alpha = default_step_size("fgsm", eps) if step_size is None else step_size
    geometry = GEOMETRIES.get(norm)(eps)
    with eval_mode(model):
        grad, _ = _input_grad(model, x, y, loss_fn)
        return geometry.project(geometry.step(x, grad, alpha), x).detach()


def fgsm_rs(model: nn.Module, x: torch.Tensor, y, *, eps: float, step_size: float | None = None, norm: str = "linf",
            loss_fn: LossFn = ce_loss, generator: torch.Generator | None = None) -> torch.Tensor:
    """FGSM from a uniform random start with step 1.25*eps ("fast AT", Wong et al. 2020; DAT-FGSM)."""
    alpha = default_step_size("fgsm_rs", eps) if step_size is None else step_size
    geometry = GEOMETRIES.get(norm)(eps)
    with eval_mode(model):
        x_adv = geometry.random_start(x, generator)
        grad, _ = _input_grad(model, x_adv, y, loss_fn)
        return geometry.project(geometry.step(x_adv, grad, alpha), x).detach()


def pgd(model: nn.Module, x: torch.Tensor, y, *, eps: float, step_size: float | None = None, steps: int = 10,
        norm: str = "linf", restarts: int = 1, random_start: bool = True, loss_fn: LossFn = ce_loss,
        success_fn: SuccessFn | None = misclassified, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent in the eps-ball (Madry et al. 2018), worst case over restarts.

    ``step_size`` defaults to 2.5*eps/steps. With ``restarts > 1`` each example keeps the restart that
    fooled the model (``success_fn``), else the one with the highest loss.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1")
    alpha = default_step_size("pgd", eps, steps) if step_size is None else step_size
    geometry = GEOMETRIES.get(norm)(eps)
    best_x, best_score = None, None
    with eval_mode(model):
        for _ in range(restarts):
            x_adv = geometry.random_start(x, generator) if random_start else x.clone()
            for _ in range(steps):
                grad, _ = _input_grad(model, x_adv, y, loss_fn)
                x_adv = geometry.project(geometry.step(x_adv, grad, alpha), x).detach()
            if restarts == 1:
                return x_adv
            score = _score(model, x_adv, y, loss_fn, success_fn)
            if best_x is None:
                best_x, best_score = x_adv, score
            else:
                better = score > best_score
                best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best_x)
                best_score = torch.where(better, score, best_score)
    return best_x


def no_attack(model: nn.Module, x: torch.Tensor, y, *, eps: float, norm: str = "linf",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The clean input itself (``attack.name=none``: clean training, or no robust evaluation)."""
    return x
