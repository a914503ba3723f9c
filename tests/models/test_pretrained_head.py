"""Pretrained weights with another class count start a run: the head starts fresh, the rest comes from the file."""

from __future__ import annotations

import logging

import pytest
import torch

from dat_ds.core.errors import ConfigError
from dat_ds.data.base import DataSpec
from dat_ds.models import create_model, head_keys

IMAGENET = DataSpec(in_chans=3, num_classes=1000, img_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CIFAR10 = DataSpec(in_chans=3, num_classes=10, img_size=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "preactresnet18"])  # timm convnet and ViT, and one of ours
def test_an_imagenet_shaped_checkpoint_starts_a_ten_class_model(tmp_path, name, dat_ds_log):
    torch.manual_seed(0)
    pretrained = create_model(name, IMAGENET).backbone
    path = tmp_path / "in1k.pt"
    torch.save(pretrained.state_dict(), path)
    dat_ds_log.set_level(logging.INFO)
    model = create_model(name, CIFAR10, str(path), strict_head=False)
    head = head_keys(model.backbone)
    assert head and all(model.backbone.state_dict()[k].shape[0] == 10 for k in head if k.endswith("weight"))
    for key, value in pretrained.state_dict().items():
        if key not in head:
            torch.testing.assert_close(model.backbone.state_dict()[key], value)
    assert "is for 1000 classes, this data set has 10: it starts from fresh weights" in dat_ds_log.text
    with pytest.raises(ConfigError, match=r"do not fit model .* tensors have other shapes"):
        create_model(name, CIFAR10, str(path))  # strict (evaluation, model.strict_head=true): refused


def test_weights_of_another_architecture_are_still_refused(tmp_path):
    torch.save(create_model("small_cnn", CIFAR10).backbone.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="do not fit model 'tiny_cnn'"):
        create_model("tiny_cnn", CIFAR10, str(tmp_path / "w.pt"), strict_head=False)


def test_adversarial_fine_tuning_of_a_pretrained_vit_with_a_new_head(tmp_path):
    """Supervised adversarial fine-tuning from a pretrained checkpoint: ``model.weights`` (1000 classes) with the
    default ``model.strict_head=false`` starts a 10-class ViT whose new head and body both train under PGD-AT."""
    from dat_ds.core.config import build_config
    from dat_ds.objectives import ObjectiveContext, build_objective, plain_step
    from dat_ds.optim import param_groups
    from dat_ds.runtime.build import make_model

    torch.manual_seed(0)
    torch.save(create_model("test_vit", IMAGENET).backbone.state_dict(), tmp_path / "vit.pt")
    cfg = build_config(overrides=["model.name=test_vit", f"model.weights={tmp_path / 'vit.pt'}", "objective.name=madry",
                                  "attack.steps=1", "attack.eps=0.03"])
    model = make_model(cfg, CIFAR10, cfg.model.weights)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert before["backbone.head.weight"].shape[0] == 10
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    ctx = ObjectiveContext(model=model, module=model, cfg=cfg, generator=torch.Generator().manual_seed(1))
    out = plain_step(build_objective(cfg), ctx, x, y, torch.optim.SGD(param_groups(model, None), lr=0.1), model)
    assert torch.isfinite(out.loss) and out.logits.shape == (4, 10)
    for key in ("backbone.head.weight", "backbone.blocks.0.attn.qkv.weight"):
        assert not torch.equal(model.state_dict()[key], before[key]), key
