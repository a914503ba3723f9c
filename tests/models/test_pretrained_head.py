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


@pytest.mark.parametrize("name", ["test_resnet", "preactresnet18"])  # a timm model and one of ours
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
