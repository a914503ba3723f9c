"""Models: small/CIFAR models registered by name, any timm model, and the normalisation wrapper."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.registry import Registry
from .cifar import CIFAR_MODELS
from .small import SmallCNN
from .wrapper import NormalizedModel

# name -> fn(in_chans, num_classes, img_size) -> nn.Module
MODELS: Registry = Registry("model")


@MODELS.register("small_cnn")
def small_cnn(in_chans: int, num_classes: int, img_size: int) -> nn.Module:
    return SmallCNN(in_chans=in_chans, num_classes=num_classes, img_size=img_size)


@MODELS.register("small_cnn_avgpool")
def small_cnn_avgpool(in_chans: int, num_classes: int, img_size: int) -> nn.Module:
    """The demo model: small_cnn with average pooling (a smoother input-loss surface for the attacks)."""
    return SmallCNN(in_chans=in_chans, num_classes=num_classes, img_size=img_size, pool="avg")


@MODELS.register("tiny_cnn")
def tiny_cnn(in_chans: int, num_classes: int, img_size: int) -> nn.Module:
    return SmallCNN(in_chans=in_chans, num_classes=num_classes, img_size=img_size, width=8)


def _register_timm_cifar(name: str) -> None:
    # The CIFAR models live in timm's registry (so plain timm code can build them); listing them here
    # too makes `dat-ds list models` show them.
    def build(in_chans: int, num_classes: int, img_size: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)

    MODELS.register(name)(build)


for _name in CIFAR_MODELS:
    _register_timm_cifar(_name)


def model_names() -> list[str]:
    return MODELS.names()


def _timm_model(name: str, in_chans: int, num_classes: int, img_size: int) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ConfigError(
            f"unknown model {name!r}; use one of {', '.join(MODELS.names())} or a timm model name "
            "(see `timm.list_models()`)"
        )
    kwargs = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans)
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError:  # convnets take no img_size
        return timm.create_model(name, **kwargs)


def create_model(name: str, spec, weights: str | None = None) -> NormalizedModel:
    """Build ``name`` for a data set ``spec`` and wrap it with the data set's normalisation."""
    if name in MODELS:
        backbone = MODELS.get(name)(spec.in_chans, spec.num_classes, spec.img_size)
    else:
        backbone = _timm_model(name, spec.in_chans, spec.num_classes, spec.img_size)
    if weights:
        load_backbone_weights(backbone, weights)
    return NormalizedModel(backbone, spec.mean, spec.std)


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights file {path!r} not found; give a local .safetensors or .pt file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise ConfigError(f"cannot load weights {path!r} safely ({type(e).__name__}); use a safetensors file") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes: weights of another width/depth/class count
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)[:200]
        raise ConfigError(f"weights {path!r} do not fit this model ({first.strip()}); check model.name and the data set") from None
    if missing or unexpected:
        raise ConfigError(
            f"weights {path!r} do not fit this model (missing {len(missing)} keys, e.g. {missing[:2]}, "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:2]}); check model.name"
        )


__all__ = ["MODELS", "NormalizedModel", "SmallCNN", "create_model", "model_names"]
