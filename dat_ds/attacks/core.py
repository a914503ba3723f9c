"""FGSM, FGSM with random start, and PGD: pure keyword-only functions.

Contract shared by every attack:
- gradients are taken with ``torch.autograd.grad`` w.r.t. the input only; parameter ``.grad`` is never
  touched, so an attack can run between ``engine.backward`` and ``engine.step`` without harm;
- the model runs in eval mode (BatchNorm uses running statistics, dropout is off) and its train/eval
  flags are restored afterwards;
- inputs and outputs are images in [0, 1]; eps and step sizes are in the same pixel units;
- randomness comes only from the explicit ``generator``.

``init_delta`` (FGSM, FGSM-RS, PGD): a start perturbation to use instead of the clean point or the random
start, e.g. the example's perturbation from the previous epoch (ATTA, Zheng et al. 2020). The start is
projected into the ball and the image box first, so any tensor of ``x``'s shape is a valid start.
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
    "nfgsm": lambda eps, steps: eps,  # de Jorge et al. 2022: step eps from noise of 2 eps
}
NFGSM_NOISE_MULTIPLIER = 2.0  # N-FGSM's noise radius in units of eps (the paper's k = 2)


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


def _start(geometry, x: torch.Tensor, init_delta: torch.Tensor) -> torch.Tensor:
    """``x + init_delta`` projected into the ball and [0, 1]."""
    if init_delta.shape != x.shape:
        raise ValueError(f"init_delta has shape {tuple(init_delta.shape)}, the input {tuple(x.shape)}")
    return geometry.project(x + init_delta.to(dtype=x.dtype), x)


def fgsm(model: nn.Module, x: torch.Tensor, y, *, eps: float, step_size: float | None = None, norm: str = "linf",
         loss_fn: LossFn = ce_loss, init_delta: torch.Tensor | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One gradient step of size eps from the clean point (Goodfellow et al.; signed for L-inf, normalised for L2),
    or from ``x + init_delta``.

    Deterministic: ``generator`` is accepted so every attack shares ``(model, x, y, *, eps, norm, generator)``.
    """
    alpha = default_step_size("fgsm", eps) if step_size is None else step_size
    geometry = GEOMETRIES.get(norm)(eps)
    with eval_mode(model):
        x0 = x if init_delta is None else _start(geometry, x, init_delta)
        grad, _ = _input_grad(model, x0, y, loss_fn)
        return geometry.project(geometry.step(x0, grad, alpha), x).detach()


def fgsm_rs(model: nn.Module, x: torch.Tensor, y, *, eps: float, step_size: float | None = None, norm: str = "linf",
            loss_fn: LossFn = ce_loss, init_delta: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """FGSM from a uniform random start (or ``x + init_delta``) with step 1.25*eps ("fast AT", Wong et al. 2020;
    DAT-FGSM)."""
    alpha = default_step_size("fgsm_rs", eps) if step_size is None else step_size
    geometry = GEOMETRIES.get(norm)(eps)
    with eval_mode(model):
        x_adv = geometry.random_start(x, generator) if init_delta is None else _start(geometry, x, init_delta)
        grad, _ = _input_grad(model, x_adv, y, loss_fn)
        return geometry.project(geometry.step(x_adv, grad, alpha), x).detach()


def nfgsm(model: nn.Module, x: torch.Tensor, y, *, eps: float, step_size: float | None = None, norm: str = "linf",
          noise_multiplier: float = NFGSM_NOISE_MULTIPLIER, loss_fn: LossFn = ce_loss,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """N-FGSM (de Jorge et al., NeurIPS 2022): FGSM from noise drawn uniformly in the ball of radius k*eps
    (k = ``noise_multiplier``, 2 in the paper), step eps, and *no* projection back to the eps-ball.

    The larger noise and the missing projection are what keep single-step training away from catastrophic
    overfitting without GradAlign's double backprop; the price is that a training example lies up to
    (k*eps + step) from x (3 eps at the defaults). Only the image box [0, 1] is enforced.
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must be >= 0")
    alpha = default_step_size("nfgsm", eps) if step_size is None else step_size
    noise = GEOMETRIES.get(norm)(noise_multiplier * eps)
    with eval_mode(model):
        x_noisy = noise.random_start(x, generator)  # clamped to [0, 1]: the model only ever sees images
        grad, _ = _input_grad(model, x_noisy, y, loss_fn)
        return noise.step(x_noisy, grad, alpha).clamp_(0, 1).detach()


def pgd(model: nn.Module, x: torch.Tensor, y, *, eps: float, step_size: float | None = None, steps: int = 10,
        norm: str = "linf", restarts: int = 1, random_start: bool = True, loss_fn: LossFn = ce_loss,
        success_fn: SuccessFn | None = misclassified, init_delta: torch.Tensor | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent in the eps-ball (Madry et al. 2018), worst case over restarts.

    ``step_size`` defaults to 2.5*eps/steps. With ``restarts > 1`` each example keeps the restart that
    fooled the model (``success_fn``), else the one with the highest loss. ``init_delta`` replaces the
    first restart's start (random or clean); later restarts start at random.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1")
    alpha = default_step_size("pgd", eps, steps) if step_size is None else step_size
    geometry = GEOMETRIES.get(norm)(eps)
    best_x, best_score = None, None
    with eval_mode(model):
        for restart in range(restarts):
            if restart == 0 and init_delta is not None:
                x_adv = _start(geometry, x, init_delta)
            else:
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
