"""CIFAR-stem models used by the adversarial-training literature, registered with timm's registry.

``timm.create_model("preactresnet18", num_classes=10, in_chans=3)`` works once ``dat_ds.models`` is
imported, and so does ``--set model.name=wideresnet34_10``. The stems keep 32x32 inputs at full
resolution (3x3 conv, no max-pool), unlike timm's ImageNet ResNets.

- PreActResNet-18 (He et al., ECCV 2016): the model of Fast AT (Wong et al. 2020) and the DAT paper's
  CIFAR experiments.
- WideResNet-d-k (Zagoruyko & Komodakis, BMVC 2016): WRN-34-10 is the standard PGD-AT / TRADES
  benchmark model, WRN-28-10 the RST one; WRN-16-4 is a small one for tests.

Each takes ``act="relu"`` (default) or ``act="silu"`` (``model.act``): SiLU/Swish everywhere the ReLU was, as in
the WideResNets of Gowal et al. 2020 and DM-Improves-AT (Wang et al. 2023). The weights are the same tensors
either way, so a checkpoint loads into both: the activation is part of the run config, not of the state dict.

No pretrained weights exist for these names; ``model.weights`` loads a local file instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from ..core.errors import ConfigError
from .checkpointing import checkpoint_segments

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU}  # core.names.ACTIVATIONS


def make_act(act: str) -> nn.Module:
    if act not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {act!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]()


class PreActBlock(nn.Module):
    """BN-act-conv twice; the shortcut taps the pre-activation when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, drop_rate: float = 0.0, act: str = "relu"):
        super().__init__()
        self.drop_rate = drop_rate  # WideResNet's dropout between the two convs
        self.act = make_act(act)  # stateless: one module serves both places
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.act(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class _Classifier(nn.Module):
    """The timm model surface our code and users rely on: num_classes, forward_features/head, reset, and
    ``set_grad_checkpointing`` (``model.grad_checkpointing``: each residual block is a checkpointed segment)."""

    num_classes: int
    num_features: int
    fc: nn.Module
    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpoint_segments(self.layers, self.conv1(x), self.grad_checkpointing)
        return self.act(self.bn(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class PreActResNet(_Classifier):
    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_chans: int = 3, width: int = 64,
                 act: str = "relu"):
        super().__init__()
        self.num_classes = num_classes
        self.act = make_act(act)
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], width
        for i, n in enumerate(num_blocks):
            planes = width * 2**i
            for j in range(n):
                layers.append(PreActBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1, act=act))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)  # pre-activation nets need a final BN-act before pooling
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes) if num_classes > 0 else nn.Identity()


class WideResNet(_Classifier):
    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, act: str = "relu"):
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(f"WideResNet depth {depth} must be 6n+4 (e.g. 16, 28, 34)")
        n = (depth - 4) // 6
        self.num_classes = num_classes
        self.act = make_act(act)
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                layers.append(PreActBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1, drop_rate=drop_rate,
                                          act=act))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # for SiLU too, as DM-Improves-AT
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


# timm passes pretrained_cfg / pretrained_cfg_overlay / cache_dir to every entrypoint; img_size is
# accepted (dat-ds passes it to any model) but these convnets are resolution-agnostic.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "img_size")


def _build(cls: type, name: str, pretrained: bool, kwargs: dict[str, Any], **arch: Any) -> nn.Module:
    if pretrained:
        raise ConfigError(f"{name} has no pretrained weights; use pretrained=False and model.weights=<local file>")
    for key in _TIMM_ONLY:
        kwargs.pop(key, None)
    model = cls(**arch, **kwargs)
    model.pretrained_cfg = model.default_cfg = {"architecture": name, "num_classes": model.num_classes,
                                                "input_size": (3, 32, 32), "classifier": "fc"}
    return model


@register_model
def preactresnet18(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """PreActResNet-18 with a CIFAR stem (11.2M parameters at 10 classes)."""
    return _build(PreActResNet, "preactresnet18", pretrained, kwargs, num_blocks=(2, 2, 2, 2))


@register_model
def wideresnet16_4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-16-4 (2.7M parameters): a small wide net for tests and quick runs."""
    return _build(WideResNet, "wideresnet16_4", pretrained, kwargs, depth=16, widen_factor=4)


@register_model
def wideresnet28_10(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-28-10 (36.5M parameters), the RST / semi-supervised robust-training model."""
    return _build(WideResNet, "wideresnet28_10", pretrained, kwargs, depth=28, widen_factor=10)


@register_model
def wideresnet34_10(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-34-10 (46.2M parameters), the PGD-AT / TRADES benchmark model."""
    return _build(WideResNet, "wideresnet34_10", pretrained, kwargs, depth=34, widen_factor=10)


CIFAR_MODELS = ("preactresnet18", "wideresnet16_4", "wideresnet28_10", "wideresnet34_10")
