"""What makes adversarial training cheaper without editing the loop: the one training-attack call that
honours ``attack.steps_schedule`` and ``attack.reuse``, and GradAlign's regulariser.

- ``attack.steps_schedule: [first, last]``: the PGD step count ramps linearly from ``first`` at the run's
  first step to ``last`` at its final step (rounded half up), so early epochs, when the model is weak and
  a cheap attack suffices, cost less. It depends only on the global step, so a resumed run uses the same
  counts. The step size follows the count (PGD-k's standard 2.5*eps/k) unless ``attack.step_size`` is set.
- ``attack.reuse`` (ATTA): the attack starts from the example's stored perturbation (``reuse.PerturbationStore``)
  and its result is stored for the next epoch.
- ``objective.grad_align`` (GradAlign, Andriushchenko & Flammarion, NeurIPS 2020): lambda * (1 - cos) of the
  input gradients at x and at a uniform random point of the eps-ball, by double backprop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attacks import GEOMETRIES, attack_from_config, ce_loss, misclassified
from ..core.config import replace
from .eps_warmup import warmed_up


def scheduled_steps(first: int, last: int, step: int, total_steps: int) -> int:
    """The attack's step count at global step ``step`` (0-based) of ``total_steps``: linear from first to last."""
    if total_steps <= 1:
        return last
    t = min(max(step, 0), total_steps - 1) / (total_steps - 1)
    return int(math.floor(first + (last - first) * t + 0.5))


def _attack_config(ctx):
    a = ctx.cfg.attack
    if a.steps_schedule:
        first, last = a.steps_schedule
        a = replace(a, steps=scheduled_steps(first, last, ctx.step, ctx.total_steps))
    return warmed_up(a, ctx.step, ctx.steps_per_epoch)  # attack.eps_warmup_epochs (eps_warmup.py)


def training_attack(ctx, x: torch.Tensor, y, *, loss_fn=ce_loss, success_fn=misclassified) -> torch.Tensor:
    """The configured training attack on (x, y), with the step schedule, eps warm-up and perturbation reuse applied."""
    cfg = _attack_config(ctx)
    store = ctx.perturbations
    if store is None:
        return attack_from_config(cfg, ctx.attack_module, x, y, generator=ctx.generator, loss_fn=loss_fn,
                                  success_fn=success_fn)
    if ctx.index is None:
        raise RuntimeError("attack.reuse needs the batch's example ids (ctx.index); the training loader yields them")
    random_delta = GEOMETRIES.get(cfg.norm)(cfg.eps).random_start(x, ctx.generator) - x
    start = store.initial_delta(ctx.index, random_delta)
    x_adv = attack_from_config(cfg, ctx.attack_module, x, y, generator=ctx.generator, loss_fn=loss_fn,
                               success_fn=success_fn, init_delta=start)
    store.update(ctx.index, x_adv - x)
    return x_adv


def _sq_norms(g: torch.Tensor) -> torch.Tensor:
    return g.flatten(1).pow(2).sum(dim=1)


def grad_align(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GradAlign's ``1 - cos(grad_x CE(x, y), grad_x CE(x + eta, y))``, eta uniform in the eps-ball.

    Returns ``(penalty, cos)``: the batch mean of 1 - cos over the examples whose two gradients are both
    non-zero (as in the authors' code), differentiable in the model's parameters, and the detached mean
    cosine. ``model`` is the bare module in train mode (not the DeepSpeed engine, whose forward allows no
    backward but ``engine.backward``): the second gradient is taken with ``create_graph=True`` so
    ``engine.backward(loss + lambda * penalty)`` differentiates through it (double backprop); the first is a
    constant, as in the authors' code. Both forwards update BatchNorm's running statistics.
    """
    x_clean = x.detach().requires_grad_(True)
    (g_clean,) = torch.autograd.grad(F.cross_entropy(model(x_clean).float(), y), x_clean)
    x_noisy = GEOMETRIES.get(norm)(eps).random_start(x, generator).detach().requires_grad_(True)
    (g_noisy,) = torch.autograd.grad(F.cross_entropy(model(x_noisy).float(), y), x_noisy, create_graph=True)
    sq_clean, sq_noisy = _sq_norms(g_clean), _sq_norms(g_noisy)
    # clamp_min before sqrt: a zero gradient would give sqrt's backward 0/0; such examples are masked out.
    norms = sq_clean.clamp_min(1e-30).sqrt() * sq_noisy.clamp_min(1e-30).sqrt()
    cos = (g_clean.flatten(1) * g_noisy.flatten(1)).sum(dim=1) / norms
    valid = ((sq_clean > 0) & (sq_noisy > 0)).to(cos.dtype)
    count = valid.sum().clamp_min(1.0)
    penalty = ((1.0 - cos) * valid).sum() / count
    return penalty, ((cos * valid).sum() / count).detach()
