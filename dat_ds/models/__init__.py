"""Models: small/CIFAR models registered by name, any timm model, and the normalisation wrapper."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..core import names
from ..core.errors import ConfigError
from ..core.registry import Registry
from .checkpointing import enable_grad_checkpointing
from .cifar import CIFAR_MODELS
from .small import SmallCNN
from .wrapper import NormalizedModel

log = logging.getLogger(__name__)

# name -> fn(in_chans, num_classes, img_size) -> nn.Module; the CIFAR models also take act="relu"|"silu"
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
    def build(in_chans: int, num_classes: int, img_size: int, act: str = "relu") -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, act=act)

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


def _declared_statistics(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The input mean/std a timm model declares in its ``pretrained_cfg`` (those its pretrained weights were
    trained with), or None: ours declare none, and timm's ``pretrained_cfg`` is a dict or a ``PretrainedCfg``."""
    cfg = getattr(backbone, "pretrained_cfg", None)
    get = cfg.get if isinstance(cfg, Mapping) else (lambda key: getattr(cfg, key, None))
    mean, std = get("mean"), get("std")
    if not mean or not std:
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class InputStatistics(NamedTuple):
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where they come from, for the log
    chosen: str  # "data" or "model": what ``model.normalization`` (maybe "auto") resolved to


def input_statistics(backbone: nn.Module, name: str, spec, normalization: str, pretrained: bool) -> InputStatistics:
    """The input mean/std for ``model.normalization``.

    ``data``: the data set's. ``model``: the model's ``pretrained_cfg`` statistics; a model that declares none, or
    declares them for another channel count, is a ConfigError. ``auto``: the model's when it starts from
    pretrained weights (``pretrained``: ``model.weights`` is set) and declares them for the data's channels, else
    the data set's. Depends on the config alone (never on whether weights are loaded now), so the run loader,
    which rebuilds the model before loading the checkpoint's weights, gets what training used."""
    if normalization not in names.NORMALIZATIONS:
        raise ConfigError(f"model.normalization={normalization!r}; allowed: {', '.join(names.NORMALIZATIONS)}")
    if normalization == "data" or (normalization == "auto" and not pretrained):
        return InputStatistics(tuple(spec.mean), tuple(spec.std), "the data set's statistics", "data")
    declared = _declared_statistics(backbone)
    if declared is None:
        why = f"model {name!r} declares no mean/std in a timm pretrained_cfg"
    elif len(declared[0]) != spec.in_chans or len(declared[1]) != spec.in_chans:
        why = (f"the timm pretrained_cfg of model {name!r} has mean/std for {len(declared[0])} channels, the data "
               f"{spec.in_chans}")
    else:
        return InputStatistics(declared[0], declared[1], f"the timm pretrained_cfg of model {name!r}", "model")
    if normalization == "model":
        raise ConfigError(f"model.normalization=model: {why}; use model.normalization=data (or auto)")
    return InputStatistics(tuple(spec.mean), tuple(spec.std), f"the data set's statistics ({why})", "data")


def create_model(name: str, spec, weights: str | None = None, act: str = "relu", *, strict_head: bool = True,
                 normalization: str = "data", pretrained: bool | None = None,
                 grad_checkpointing: bool = False) -> NormalizedModel:
    """Build ``name`` for a data set ``spec`` and wrap it with its input normalisation (``input_statistics``).

    ``act`` (``model.act``) is the CIFAR models' activation; the other models have their own and take only "relu"
    (the default, meaning "as built"). ``strict_head=False`` (training: ``model.strict_head``) lets ``weights``
    with another class count start the model: its classifier head starts from fresh weights. ``normalization``
    is ``model.normalization`` ("data", the data set's statistics, unless a run config says otherwise);
    ``pretrained`` whether the run starts from pretrained weights (default: whether ``weights`` is given; the
    run loader says so for a run whose weights it loads afterwards). ``grad_checkpointing``
    (``model.grad_checkpointing``) turns on activation checkpointing (``models.checkpointing``), or refuses a model
    that has none."""
    if act != "relu":
        if name not in CIFAR_MODELS:
            raise ConfigError(f"model.act={act} applies to the models {', '.join(CIFAR_MODELS)}, not {name!r}")
        backbone = MODELS.get(name)(spec.in_chans, spec.num_classes, spec.img_size, act=act)
    elif name in MODELS:
        backbone = MODELS.get(name)(spec.in_chans, spec.num_classes, spec.img_size)
    else:
        backbone = _timm_model(name, spec.in_chans, spec.num_classes, spec.img_size)
    stats = input_statistics(backbone, name, spec, normalization, bool(weights) if pretrained is None else pretrained)
    if weights:
        load_backbone_weights(backbone, weights, name, strict_head=strict_head)
    if grad_checkpointing:
        enable_grad_checkpointing(backbone, name)
    return NormalizedModel(backbone, stats.mean, stats.std, source=stats.source)


def normalization_of(model: nn.Module) -> NormalizedModel | None:
    """The ``NormalizedModel`` inside ``model`` (itself, or inside what an objective built around it)."""
    return next((m for m in model.modules() if isinstance(m, NormalizedModel)), None)


def head_keys(backbone: nn.Module) -> list[str]:
    """The state-dict keys of the classifier head: timm's ``get_classifier()``, else the last Linear layer."""
    head = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
    if not isinstance(head, nn.Module):
        linears = [m for m in backbone.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        return []
    prefix = next(name for name, module in backbone.named_modules() if module is head)
    return [f"{prefix}.{k}" if prefix else k for k in head.state_dict()]


def remove_head(backbone: nn.Module, name: str) -> nn.Module:
    """``backbone`` without its classifier head, in place: its output is the pooled representation (timm's and our
    CIFAR models' ``reset_classifier(0)``, ``forward_head(pre_logits=True)``'s features; ``small_cnn``'s hidden layer)."""
    if hasattr(backbone, "reset_classifier"):
        backbone.reset_classifier(0)
    elif isinstance(backbone, SmallCNN):
        backbone.fc = nn.Identity()
    else:
        raise ConfigError(f"model {name!r} has no reset_classifier to remove its head with; use a timm model or one "
                          "of ours")
    return backbone


def _weights_format(path: Path) -> str | None:
    """What the file holds, from its first bytes (the suffix may lie): safetensors, torch or neither."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"  # an 8-byte little-endian header length, then the JSON header
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip archive, or a legacy pickle
        return "torch"
    return None


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict in a local .safetensors or torch file; any unreadable file is one ConfigError line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights file {path!r} not found; give a local .safetensors or .pt file")
    kind = _weights_format(p)
    if kind is None:
        raise ConfigError(f"model.weights file {path!r} is neither a safetensors nor a torch file; give a "
                          ".safetensors file (e.g. from `dat-ds export`) or a .pt state dict")
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: a damaged file is the user's problem
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"model.weights file {path!r} is a damaged safetensors file ({first}); "
                              "export it again (`dat-ds export`)") from None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise ConfigError(f"cannot load weights {path!r} safely ({type(e).__name__}); use a safetensors file") from None
    for key in ("state_dict", "module", "model"):  # training checkpoints (DeepSpeed's model_states: "module")
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights file {path!r} holds a {type(state).__name__}, not a state dict of "
                          "tensors; save model.state_dict() (or use `dat-ds export`)")
    return state


def load_backbone_weights(backbone: nn.Module, path: str, model_name: str | None = None, *,
                          strict_head: bool = True) -> None:
    """Load ``path`` into ``backbone``; keys and shapes must match exactly (said in one line otherwise), except,
    with ``strict_head=False``, the classifier head's shapes (another class count: the head starts fresh)."""
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in read_weights(path).items()}
    model = f"model {model_name!r}" if model_name else "this model"
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ConfigError(
            f"weights {path!r} do not fit {model} (missing {len(missing)} keys, e.g. {missing[:2]}, "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:2]}); give weights saved from {model} or set "
            "model.name to theirs"
        )
    shapes = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    head = head_keys(backbone)
    if shapes and not strict_head and set(shapes) <= set(head):  # a pretrained model, another class count
        log.info("model.weights %s: the head (%s) is for %d classes, this data set has %d: it starts from fresh "
                 "weights, the rest from the file (model.strict_head=true refuses instead)", path, ", ".join(shapes),
                 state[shapes[0]].shape[0], own[shapes[0]].shape[0])
        state = {**state, **{k: own[k] for k in head}}
        shapes = []
    if shapes:  # same names, other shapes: weights of another width/depth/class count
        k = shapes[0]
        raise ConfigError(
            f"weights {path!r} do not fit {model} ({len(shapes)} of {len(own)} tensors have other shapes, e.g. "
            f"{k} {list(state[k].shape)} vs {list(own[k].shape)}); give weights saved from {model} and this "
            "data set (class count, channels)"
        )
    backbone.load_state_dict(state, strict=True)


__all__ = ["MODELS", "NormalizedModel", "SmallCNN", "InputStatistics", "create_model", "enable_grad_checkpointing",
           "input_statistics", "model_names", "normalization_of", "read_weights", "remove_head"]
