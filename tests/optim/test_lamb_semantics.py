"""LAMB and LARS (timm) mean what the DeepSpeed JSON says.

timm's defaults would otherwise decide: ``weight_decay=0`` switched the trust ratio off for every tensor (LAMB
became Adam, LARS became SGD), a JSON without ``weight_decay`` got timm's 0.01 on every tensor (biases and
norms included), and timm's Lamb clipped the global gradient norm at 1.0 although the JSON said
``"gradient_clipping": 0.0``. Each one-step update below is compared with LAMB/LARS written out by hand.
"""

from __future__ import annotations

import logging

import pytest
import torch

from dat_ds.core.errors import ConfigError
from dat_ds.optim import build_optimizer, check_optimizer_params, param_groups


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3), torch.nn.LayerNorm(3))


def _one_step(section: dict, weight: torch.Tensor, grad: torch.Tensor, bias: torch.Tensor, bias_grad: torch.Tensor):
    """One optimizer step on a weight matrix and a bias, built as the trainer builds it."""
    model = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
    model.weight.grad, model.bias.grad = grad.clone(), bias_grad.clone()
    weight_decay = (section.get("params") or {}).get("weight_decay")
    build_optimizer(section, param_groups(model, weight_decay)).step()
    return model.weight.detach().double(), model.bias.detach().double()


def _lamb_step(w, g, *, lr, eps, weight_decay, trust_ratio):
    """LAMB's first step (You et al. 2020), zero state, bias-corrected: m_hat = g, v_hat = g**2."""
    w, g = w.double(), g.double()
    update = g / (g.abs() + eps) + weight_decay * w
    ratio = w.norm() / update.norm() if trust_ratio else 1.0
    return w - lr * ratio * update


def _tensors():
    gen = torch.Generator().manual_seed(0)
    weight = 0.05 * torch.randn(3, 4, generator=gen)  # ||w|| far from ||update||: the trust ratio shows
    # A large gradient with entries over four orders of magnitude: clipping it to norm 1 changes the
    # direction of g / (|g| + eps) (eps = 0.1 here), which no trust ratio undoes.
    grad = torch.tensor([[300.0, -30.0, 3.0, -0.3], [100.0, 10.0, -1.0, 0.1], [-50.0, 5.0, 0.5, -0.05]])
    bias = torch.tensor([0.5, -0.2, 0.1])
    bias_grad = torch.tensor([40.0, -0.4, 0.04])
    return weight, grad, bias, bias_grad


def test_weight_decay_zero_keeps_the_trust_ratio_on_weights_and_nothing_clips():
    weight, grad, bias, bias_grad = _tensors()
    lr, eps = 0.1, 0.1
    section = {"type": "Lamb", "params": {"lr": lr, "eps": eps, "weight_decay": 0.0}}
    new_w, new_b = _one_step(section, weight, grad, bias, bias_grad)
    torch.testing.assert_close(new_w, _lamb_step(weight, grad, lr=lr, eps=eps, weight_decay=0.0, trust_ratio=True),
                               rtol=0, atol=1e-6)
    # The bias: Adam's step, no trust ratio, no decay.
    torch.testing.assert_close(new_b, _lamb_step(bias, bias_grad, lr=lr, eps=eps, weight_decay=0.0, trust_ratio=False),
                               rtol=0, atol=1e-6)


def test_big_gradient_is_not_clipped_by_the_optimizer():
    """The JSON's "gradient_clipping": 0.0 means no clipping; the update is LAMB on the raw gradient."""
    weight, grad, bias, bias_grad = _tensors()
    lr, eps, wd = 0.1, 0.1, 1e-2
    section = {"type": "Lamb", "params": {"lr": lr, "eps": eps, "weight_decay": wd}}
    new_w, new_b = _one_step(section, weight, grad, bias, bias_grad)
    expected = _lamb_step(weight, grad, lr=lr, eps=eps, weight_decay=wd, trust_ratio=True)
    torch.testing.assert_close(new_w, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_b, _lamb_step(bias, bias_grad, lr=lr, eps=eps, weight_decay=0.0, trust_ratio=False),
                               rtol=0, atol=1e-6)
    # What clipping at norm 1 would have done: a different step, far outside the tolerance above.
    norm = torch.cat([grad.flatten(), bias_grad]).norm()
    clipped = _lamb_step(weight, grad / norm, lr=lr, eps=eps, weight_decay=wd, trust_ratio=True)
    assert (clipped - expected).abs().max() > 1e-3


def test_weight_decay_absent_means_no_decay():
    weight, grad, bias, bias_grad = _tensors()
    lr = 0.1
    section = {"type": "Lamb", "params": {"lr": lr}}  # eps: ours, 1e-6 (stated in specs.py)
    new_w, new_b = _one_step(section, weight, grad, bias, bias_grad)
    torch.testing.assert_close(new_w, _lamb_step(weight, grad, lr=lr, eps=1e-6, weight_decay=0.0, trust_ratio=True),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(new_b, _lamb_step(bias, bias_grad, lr=lr, eps=1e-6, weight_decay=0.0, trust_ratio=False),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("section", [{"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 1e-4}},
                                     {"type": "Lamb", "params": {"lr": 0.01}},
                                     {"type": "Lars", "params": {"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0}}])
@pytest.mark.parametrize("grouped", [True, False])
def test_biases_and_norm_weights_get_neither_decay_nor_trust_ratio(section, grouped):
    model = _net()
    weight_decay = section["params"].get("weight_decay")
    params = param_groups(model, weight_decay) if grouped else model.parameters()
    opt = build_optimizer(section, params)
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            seen += 1
            if p.ndim <= 1:  # conv/linear biases, BatchNorm and LayerNorm weights and biases
                assert group["weight_decay"] == 0.0 and group["always_adapt"] is False
            else:
                assert group["weight_decay"] == (weight_decay or 0.0) and group["always_adapt"] is True
    assert seen == len(list(model.parameters()))
    if "max_grad_norm" in opt.defaults:
        assert opt.defaults["max_grad_norm"] is None


def test_lars_trust_ratio_with_weight_decay_zero():
    """LARS (You et al. 2017), no momentum: w -= lr * trust_coeff * ||w|| / (||g|| + eps) * g on weights;
    the bias takes the plain SGD step."""
    weight, grad, bias, bias_grad = _tensors()
    lr, coeff = 1.0, 0.001
    section = {"type": "Lars", "params": {"lr": lr, "trust_coeff": coeff, "weight_decay": 0.0}}
    new_w, new_b = _one_step(section, weight, grad, bias, bias_grad)
    w, g = weight.double(), grad.double()
    expected = w - lr * coeff * w.norm() / (g.norm() + 1e-8) * g
    torch.testing.assert_close(new_w, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_b, bias.double() - lr * bias_grad.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["Lamb", "Lars"])
@pytest.mark.parametrize("key,match", [("max_grad_norm", "gradient_clipping"), ("always_adapt", "1-D")])
def test_keys_that_would_change_the_meaning_are_refused(name, key, match):
    with pytest.raises(ConfigError, match=match):
        check_optimizer_params({"type": name, "params": {"lr": 0.01, key: True if key == "always_adapt" else 1.0}})


def test_the_resolved_settings_are_logged_once(caplog):
    model = _net()
    with caplog.at_level(logging.INFO, logger="dat_ds.optim.factory"):
        opt = build_optimizer({"type": "Lamb", "params": {"lr": 0.01, "weight_decay": 1e-4}}, param_groups(model, 1e-4))
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "dat_ds.optim.factory"]
    assert len(lines) == 1, lines
    assert "weight decay 0.0001 on 2 weight tensors" in lines[0] and "6 1-D tensors" in lines[0]
    assert "no gradient clipping in the optimizer" in lines[0] and "eps" in lines[0]
