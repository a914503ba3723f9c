"""Adversarial weight perturbation (AWP; Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust
Generalization", NeurIPS 2020), as a wrapper around madry, dat or trades (config ``awp: {gamma, warmup_epochs}``).

One step, with ``w`` the weights and ``L`` the wrapped objective's loss (its own adversarial examples, made at w):

1. ``batch = inner.adversarial_batch(ctx, x, y)`` -- the attack, once, at w;
2. ``g = grad_w L(w; batch)`` on the bare module (``torch.autograd.grad``: the engine's accumulated gradients
   are untouched, and DeepSpeed's engine forward allows no backward but ``engine.backward``); BatchNorm's running
   statistics are put back afterwards, so this extra forward leaves no trace;
3. per weight tensor ``v_l = gamma * ||w_l|| * g_l / ||g_l||`` (the authors' one ascent step of a proxy model,
   rescaled layer by layer), on the tensors the authors perturb: names holding ``weight`` with more than one
   dimension (convolutions and linear layers; no biases, no BatchNorm);
4. ``w <- w + v``; the loop's ``engine.backward`` takes ``L(w + v; batch)`` through the engine;
5. ``after_backward``: ``w`` is copied back (bit-exact, not ``w + v - v``) before ``engine.step()``, so the
   optimizer updates the original weights with the gradient taken at ``w + v``.

Before ``awp.warmup_epochs`` the wrapper is the inner objective. The extra cost is one forward and backward per
step. ZeRO-3 partitions the weights, so ``awp`` refuses it (``core.config.check_engine``); ZeRO-1/2 keep full
weights on every rank and partition only gradients and optimizer state.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..core.config import RunConfig
from .base import AdversarialBatch, Objective, ObjectiveContext, ObjectiveOutput, SplitObjective

EPS = 1e-20  # the authors' guard for an all-zero gradient


def perturbed_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The tensors AWP perturbs: trainable ``*weight*`` parameters with more than one dimension (the authors' rule)."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad and p.dim() > 1 and "weight" in n]


@contextlib.contextmanager
def kept_buffers(module: nn.Module) -> Iterator[None]:
    """Put every buffer (BatchNorm's running statistics, its batch counter) back as it was on exit."""
    saved = [(b, b.detach().clone()) for _, b in module.named_buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def layer_perturbation(weights: list[torch.Tensor], grads: list[torch.Tensor | None], gamma: float) -> list[torch.Tensor]:
    """``gamma * ||w_l|| * g_l / (||g_l|| + EPS)`` for each layer (zeros where the loss does not reach it)."""
    out = []
    for w, g in zip(weights, grads):
        if g is None:
            out.append(torch.zeros_like(w))
            continue
        g = g.detach().to(w.dtype)
        out.append(g * (gamma * w.detach().norm() / (g.norm() + EPS)))
    return out


class AWP(Objective):
    """``inner`` (a :class:`SplitObjective`) trained at adversarially perturbed weights; see the module docstring."""

    def __init__(self, inner: Objective, cfg: RunConfig):
        if not isinstance(inner, SplitObjective):
            raise TypeError(f"awp wraps an objective split into attack and loss, not {type(inner).__name__}")
        super().__init__(cfg)
        assert cfg.awp is not None
        self.inner, self.gamma, self.warmup_epochs = inner, cfg.awp.gamma, cfg.awp.warmup_epochs
        self.replays, self.needs_labels, self.gathers_attacks = inner.replays, inner.needs_labels, inner.gathers_attacks
        self._originals: list[tuple[nn.Parameter, torch.Tensor]] = []  # the weights to copy back after backward

    def active(self, ctx: ObjectiveContext) -> bool:
        return ctx.step >= self.warmup_epochs * ctx.steps_per_epoch

    def perturbation(self, ctx: ObjectiveContext, batch: AdversarialBatch) -> dict[str, torch.Tensor]:
        """``{name: v}`` for the current weights of ``ctx.module`` and this batch (nothing applied)."""
        named = perturbed_weights(ctx.module)
        weights = [p for _, p in named]
        # This forward must not move BatchNorm's running statistics; they go back after the backward, which
        # checks that the tensors it saved (the running statistics among them) were not changed in between.
        with kept_buffers(ctx.module):
            ascent = self.inner.loss(ctx, ctx.module, batch)
            grads = torch.autograd.grad(ascent.loss, weights, allow_unused=True)
        return {n: v for (n, _), v in zip(named, layer_perturbation(weights, list(grads), self.gamma))}

    def apply(self, ctx: ObjectiveContext, perturbation: dict[str, torch.Tensor]) -> None:
        """``w <- w + v``, keeping ``w`` to copy back in :meth:`restore`."""
        self.restore()
        params = dict(perturbed_weights(ctx.module))
        with torch.no_grad():
            for name, v in perturbation.items():
                p = params[name]
                self._originals.append((p, p.detach().clone()))
                p.add_(v)

    def restore(self) -> None:
        """Copy the unperturbed weights back (bit-exact); a no-op when none are perturbed."""
        with torch.no_grad():
            for p, original in self._originals:
                p.copy_(original)
        self._originals = []

    def __call__(self, ctx: ObjectiveContext, x: torch.Tensor, y: torch.Tensor) -> ObjectiveOutput:
        batch = self.inner.adversarial_batch(ctx, x, y)
        if self.active(ctx):
            self.apply(ctx, self.perturbation(ctx, batch))
        return self.inner.loss(ctx, ctx.model, batch)

    def after_backward(self) -> None:
        self.restore()  # before engine.step(): the optimizer updates w with the gradient taken at w + v
        self.inner.after_backward()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
