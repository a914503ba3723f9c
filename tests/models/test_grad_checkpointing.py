"""``model.grad_checkpointing``: the same gradients, attacks and BatchNorm statistics, with less memory held.

Comparisons are exact (``torch.equal``): on CPU a recomputed segment runs the same kernels on the same inputs, so
checkpointing changes no bit of the gradients, of ``x_adv`` or of the running statistics.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from dat_ds.attacks import pgd
from dat_ds.core.config import build_config
from dat_ds.core.errors import ConfigError
from dat_ds.data.base import DataSpec
from dat_ds.launch.preflight import check_grad_checkpointing
from dat_ds.models import create_model, enable_grad_checkpointing
from dat_ds.models.cifar import PreActResNet, WideResNet
from dat_ds.models.small import SmallCNN
from dat_ds.runtime.build import make_model

SPEC = DataSpec(in_chans=3, num_classes=5, img_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

# Tiny members of each family: ours (BatchNorm; WideResNet with dropout, to replay its draws), and timm's own
# set_grad_checkpointing on a BatchNorm convnet and a ViT.
BUILDERS = {
    "preactresnet": lambda: PreActResNet(num_blocks=(1, 1), num_classes=5, width=4),
    "wideresnet_dropout": lambda: WideResNet(depth=10, widen_factor=1, num_classes=5, drop_rate=0.3),
    "small_cnn": lambda: SmallCNN(in_chans=3, num_classes=5, width=4, img_size=8),
    "timm_test_resnet": lambda: _timm("test_resnet"),
    "timm_test_vit": lambda: _timm("test_vit", img_size=8, patch_size=4),
}


def _timm(name, **kwargs):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs)


def _pair(name):
    torch.manual_seed(0)
    plain = BUILDERS[name]()
    checkpointed = copy.deepcopy(plain)
    enable_grad_checkpointing(checkpointed, name)
    return plain, checkpointed


def _batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train_step(model, x, y):
    model.train()
    torch.manual_seed(2)  # the same dropout draws in both models
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", BUILDERS)
def test_gradients_and_batchnorm_statistics_are_unchanged(name):
    plain, checkpointed = _pair(name)
    x, y = _batch()
    grads, grads_ckpt = _train_step(plain, x, y), _train_step(checkpointed, x, y)
    assert all(g is not None for g in grads_ckpt.values())  # every segment's weights get a gradient
    for key, g in grads.items():
        assert torch.equal(g, grads_ckpt[key]), key
    # Recomputation ran each BatchNorm a second time in train mode; the running statistics moved once.
    for (key, b), b_ckpt in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.equal(b, b_ckpt), key
    counts = [b for k, b in checkpointed.state_dict().items() if k.endswith("num_batches_tracked")]
    assert all(int(c) == 1 for c in counts)


@pytest.mark.parametrize("name", ["preactresnet", "timm_test_vit"])
def test_the_attack_finds_the_same_adversarial_examples(name):
    plain, checkpointed = _pair(name)
    x, y = _batch()
    x_adv = [pgd(m, x, y, eps=8 / 255, steps=2, generator=torch.Generator().manual_seed(3)) for m in (plain, checkpointed)]
    assert torch.equal(*x_adv) and not torch.equal(x_adv[0], x)


def _peak_bytes(step) -> int:
    """The most CPU memory held at once during ``step``: the running sum of the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()  # negative for a free
        peak = max(peak, held)
    return peak


def test_peak_memory_of_a_training_step_falls():
    plain, checkpointed = (m.train() for m in _pair("preactresnet"))
    for m in (plain, checkpointed):  # a deeper net, where activations outweigh the weights
        m.layers = torch.nn.Sequential(*[copy.deepcopy(m.layers[0]) for _ in range(6)], m.layers[1])
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 5, (8,))
    peaks = [_peak_bytes(lambda m=m: F.cross_entropy(m(x), y).backward()) for m in (plain, checkpointed)]
    assert peaks[1] < 0.6 * peaks[0], peaks


def test_a_model_that_cannot_checkpoint_is_one_config_error():
    cfg = build_config(overrides=["model.name=vgg11", "model.grad_checkpointing=true"])
    with pytest.raises(ConfigError, match="model 'vgg11' cannot checkpoint activations") as e:
        check_grad_checkpointing(cfg)  # the preflight's check: built on the meta device, nothing allocated
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no set_grad_checkpointing"):
        enable_grad_checkpointing(torch.nn.Linear(2, 2), "linear")


def test_the_config_field_reaches_the_model():
    cfg = build_config(overrides=["model.name=tiny_cnn", "model.grad_checkpointing=true"])
    assert make_model(cfg, SPEC, None).backbone.grad_checkpointing
    assert not create_model("tiny_cnn", SPEC).backbone.grad_checkpointing  # off by default
    check_grad_checkpointing(cfg)  # ours all can


def test_double_backprop_through_checkpointed_segments_is_unchanged():
    """GradAlign (``objective.grad_align``) differentiates an input gradient taken with ``create_graph=True``."""
    from dat_ds.objectives.fast import grad_align

    plain, checkpointed = _pair("preactresnet")
    x, y = _batch()
    results = []
    for m in (plain.train(), checkpointed.train()):
        penalty, _ = grad_align(m, x, y, eps=0.03, generator=torch.Generator().manual_seed(1))
        penalty.backward()
        results.append([penalty.detach(), *(p.grad for p in m.parameters()), *m.state_dict().values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
