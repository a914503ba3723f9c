"""Attacks on 16-bit models: torchattacks' attacks on bf16/fp16 weights, fp16 input gradients that neither underflow
nor overflow, and ``attack_view`` leaving fp32 models alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dat_ds.attacks import AttackPrecision, apgd_ce, apgd_dlr, attack_view, autoattack, fgsm, pgd, square


class _Cast(nn.Module):
    """A small classifier whose weights (and therefore logits) are in ``dtype``; inputs are fp32 images."""

    def __init__(self, dtype: torch.dtype, scale: float = 1.0, input_scale: float = 1.0):
        super().__init__()
        self.input_scale = input_scale
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(scale)
        self.net.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(next(self.net.parameters()).dtype) * self.input_scale)


def _correct_batch(model: nn.Module, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, model(x).argmax(1)  # labels the model gets right: every attack has work to do


@pytest.mark.parametrize("attack", [autoattack, apgd_ce, apgd_dlr, square], ids=lambda a: a.__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torchattacks_attacks_run_on_16_bit_models(attack, dtype):
    """torchattacks reads its losses with .cpu().numpy(), which has no bf16: this was a TypeError."""
    model = _Cast(dtype)
    x, y = _correct_batch(model)
    kwargs = {"n_queries": 20} if attack is square else {"aa_steps": 5, "n_queries": 20} if attack is autoattack \
        else {"apgd_steps": 5}
    x_adv = attack(model, x, y, eps=0.1, generator=torch.Generator().manual_seed(0), **kwargs)
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert (x_adv != x).any()


def test_fp16_input_gradients_do_not_underflow():
    """A confident model (logit margins ~40): the CE gradient of a correct example is ~e^-40, far below fp16's
    smallest subnormal (6e-8), so the bare fp16 model's input gradient is exactly zero and FGSM does not move.
    Through ``attack_view`` (the trainer's attack module) each example's gradient is scaled into range inside
    the network and divided out in fp32: the fp32 model's gradient, to fp16's precision."""
    half = _Cast(torch.float16)
    x = torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # scale the first layer so the median margin is 40, keep examples with margins 20-80
        half.net[1].bias.zero_(), half.net[-1].bias.zero_()  # logits are then linear in that scale
        top2 = torch.topk(half(x).float(), 2).values
        margin = top2[:, 0] - top2[:, 1]
        k = 40 / margin.median()
        half.net[1].weight.mul_(k.half())
        keep = ((k * margin > 20) & (k * margin < 80)).nonzero().flatten()[:16]
        x = x[keep]
        y = half(x).argmax(1)
    ref = _Cast(torch.float32)
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    top2 = torch.topk(ref(x), 2).values.detach()
    assert len(x) == 16 and (ref(x).argmax(1) == y).all() and (top2[:, 0] - top2[:, 1]).min() > 19
    x_req = x.clone().requires_grad_(True)
    bare = torch.autograd.grad(nn.functional.cross_entropy(half(x_req).float(), y, reduction="sum"), x_req)[0]
    assert not bare.any()  # the premise: the plain fp16 backward flushes to zero
    view = attack_view(half)
    assert isinstance(view, AttackPrecision) and view.grad_target > 1
    assert fgsm(half, x, y, eps=0.1).equal(x)  # the bare module: the attack does nothing
    x_adv, expected = fgsm(view, x, y, eps=0.1), fgsm(ref, x, y, eps=0.1)
    moved = (x_adv != x).float().mean()
    agree = ((x_adv - x).sign() == (expected - x).sign()).float().mean()
    assert moved > 0.9 and agree > 0.95, (moved, agree)
    assert view.grad_target == AttackPrecision.INITIAL_GRAD_TARGET  # in range: no overflow on the way
    assert view(x).dtype == torch.float32


def test_an_overflowing_fp16_attack_gradient_lowers_the_target():
    """Weights of x100 per layer grow the gradient ~300x inside the network (inputs scaled by 1/100 keep the logits
    moderate), past fp16's 65504 at the initial target: the non-finite entries count as zero once, the target
    drops, and PGD's later steps move the input."""
    model = _Cast(torch.float16, scale=100.0, input_scale=0.01)
    view = attack_view(model)
    x, y = _correct_batch(model)
    before = view.grad_target
    x_adv = pgd(view, x, y, eps=0.1, steps=3, generator=torch.Generator().manual_seed(0))
    assert view.grad_target < before
    assert torch.isfinite(x_adv).all() and (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_attack_view_leaves_fp32_models_alone():
    model = _Cast(torch.float32)
    assert attack_view(model) is model
