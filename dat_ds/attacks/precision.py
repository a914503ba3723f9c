"""What attacks and evaluation see of a model with 16-bit weights (``AttackPrecision``)."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class _Factors:
    """The per-example gradient factors of one forward, from its output's backward to its input's."""

    factors: torch.Tensor | None = None


class _ScaleOutputGrad(torch.autograd.Function):
    """Identity forward; on the way back each example's gradient is scaled so its largest entry is ``target``."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, factors: _Factors, target: float, per_example: bool) -> torch.Tensor:
        ctx.factors, ctx.target, ctx.per_example = factors, target, per_example
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows = grad.detach().reshape(grad.shape[0] if ctx.per_example else 1, -1)
        factors = ctx.target / rows.abs().amax(1).clamp_min(1e-30)  # fp32: finite for any row
        ctx.factors.factors = factors
        shape = (-1, *([1] * (grad.dim() - 1))) if ctx.per_example else ()
        return grad * factors.view(shape), None, None, None


class _UnscaleInputGrad(torch.autograd.Function):
    """Identity forward; divides each example's input gradient by its factor again, in fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factors: _Factors, guard: AttackPrecision) -> torch.Tensor:
        ctx.factors, ctx.guard, ctx.target = factors, guard, guard.grad_target
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not bool(torch.isfinite(grad).all()):  # fp16 only: one host sync per attack gradient
            ctx.guard.overflowed(ctx.target)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        factors = ctx.factors.factors
        if factors is None:  # the gradient did not come through the output (nothing was scaled)
            return grad, None, None
        shape = (-1, *([1] * (grad.dim() - 1))) if factors.numel() > 1 else ()
        return grad / factors.view(shape).to(grad.dtype), None, None


class AttackPrecision(nn.Module):
    """What attacks and evaluation see of a model with 16-bit weights: fp32 logits, and input gradients that
    neither underflow (fp16) nor break code that reads losses on the host (bf16).

    - The output comes back in fp32: torchattacks reads its losses with ``.cpu().numpy()``, which has no bf16.
    - fp16 weights: an example's loss gradient at the logits can be far below fp16's smallest number (CE of a
      confident correct prediction with margin m has gradient ~e^-m: 1e-13 at m = 30), so the plain fp16
      backward returns an input gradient of exactly zero and the attack does not move. Here each example's
      output gradient is rescaled so its largest entry is ``grad_target`` before it enters the network, and
      the input gradient is divided by the same per-example factor in fp32: the exact gradient, computed in
      range (DeepSpeed's loss scaling does the like for the weight gradients; attacks never see it). In eval
      mode examples do not interact, so per-example factors are exact. An input gradient that still
      overflows lowers ``grad_target`` 16x for later calls and counts as zero where it is not finite.
      bf16 has fp32's range: no scaling.

    Attribute lookups fall through to the wrapped module, like ``models.wrapper.AutocastModule``.
    """

    INITIAL_GRAD_TARGET = 2.0**8  # headroom of 256x for growth inside the network before fp16's 65504

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        weight = next(module.parameters(), None)
        fp16 = weight is not None and weight.dtype == torch.float16
        self.grad_target = self.INITIAL_GRAD_TARGET if fp16 else 0.0  # 0: no scaling

    def overflowed(self, target: float) -> None:
        if target == self.grad_target and self.grad_target > 1.0:
            self.grad_target = max(1.0, self.grad_target / 16)
            log.info("fp16 attack: an input gradient overflowed with per-example gradients scaled to %g; now %g",
                     target, self.grad_target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.grad_target or not torch.is_grad_enabled():
            return self.module(x).float()
        factors = _Factors()
        out = self.module(_UnscaleInputGrad.apply(x, factors, self))
        per_example = out.dim() > 0 and out.shape[0] == x.shape[0]  # else one factor for the whole batch
        return _ScaleOutputGrad.apply(out.float(), factors, self.grad_target, per_example)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def attack_view(module: nn.Module) -> nn.Module:
    """``module`` as attacks should call it: wrapped in :class:`AttackPrecision` when its weights are 16-bit."""
    if isinstance(module, AttackPrecision):
        return module
    weight = next(module.parameters(), None)
    return AttackPrecision(module) if weight is not None and weight.dtype in (torch.float16, torch.bfloat16) else module
