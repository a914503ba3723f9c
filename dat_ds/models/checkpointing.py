"""Activation checkpointing (``model.grad_checkpointing``): keep a segment's input, recompute the rest in backward.

timm models checkpoint through their own ``set_grad_checkpointing`` (timm's ``checkpoint_seq``: non-reentrant
unless ``TIMM_REENTRANT_CKPT`` says otherwise); ours (``cifar.py``, ``small.py``) through :func:`checkpoint_segments`,
torch's non-reentrant ``checkpoint``. Non-reentrant because the reentrant variant gives no parameter gradients
to a segment whose input does not require grad (the training forward's ``x_adv`` does not), and does not
support ``torch.autograd.grad`` (the attacks' input gradients). ``preserve_rng_state`` replays dropout's draws.

Checkpointing changes no result (``tests/models/test_grad_checkpointing.py``: gradients, ``x_adv`` and BatchNorm
statistics are bit-identical on CPU), with one thing to take care of: recomputation runs a segment's forward a
second time, in train mode, which would update BatchNorm's running statistics twice per step. The hooks of
:func:`batchnorm_statistics_once` make a BatchNorm that runs inside a backward pass (a recomputation: no other
forward does) normalise with the batch statistics, as the first forward did, and leave its running statistics
and batch count as they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import ConfigError


def checkpoint_segments(segments: Iterable[nn.Module], x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``x`` through ``segments`` in order, each one checkpointed when ``enabled`` and gradients are recorded."""
    record = enabled and torch.is_grad_enabled()
    for segment in segments:
        x = checkpoint(segment, x, use_reentrant=False, preserve_rng_state=True) if record else segment(x)
    return x


def _in_backward() -> bool:
    # -1 outside a backward pass; a non-reentrant (or reentrant) recomputation runs inside the one that needs it.
    return torch._C._current_graph_task_id() != -1


def _skip_statistics(module: nn.modules.batchnorm._BatchNorm, args) -> None:
    if module.training and module.track_running_stats and _in_backward():
        # Momentum 0: running = 1 * running + 0 * batch, the same values, written by the same op (so the
        # recomputation saves the tensors the first forward saved, which non-reentrant checkpoint checks).
        module._dat_ds_momentum = module.momentum
        module.momentum = 0.0


def _restore(module: nn.modules.batchnorm._BatchNorm, args, output) -> None:
    if hasattr(module, "_dat_ds_momentum"):
        module.momentum = module.__dict__.pop("_dat_ds_momentum")
        if module.num_batches_tracked is not None:
            module.num_batches_tracked.sub_(1)  # the forward counted the recomputation as a batch


def batchnorm_statistics_once(model: nn.Module) -> int:
    """Hooks on every BatchNorm of ``model`` so that a recomputation leaves its running statistics alone; returns
    how many BatchNorms got them."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(_skip_statistics)
            module.register_forward_hook(_restore)
            count += 1
    return count


def enable_grad_checkpointing(backbone: nn.Module, name: str) -> None:
    """Turn on ``backbone``'s activation checkpointing, or a one-line ConfigError for a model that has none."""
    setter = getattr(backbone, "set_grad_checkpointing", None)
    why = "it has no set_grad_checkpointing"
    if callable(setter):
        try:
            setter(True)
            why = ""
        except (AssertionError, NotImplementedError) as e:  # timm's way of saying "not supported"
            why = f"its set_grad_checkpointing refuses ({str(e).strip() or type(e).__name__})"
    if why:
        raise ConfigError(f"model.grad_checkpointing=true: model {name!r} cannot checkpoint activations ({why}); "
                          "remove model.grad_checkpointing or choose a model that can (e.g. a timm ViT/ResNet, "
                          "preactresnet18)")
    batchnorm_statistics_once(backbone)
