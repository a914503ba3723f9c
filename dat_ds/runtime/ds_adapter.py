"""What dat-ds reads or swaps of DeepSpeed beyond ``deepspeed.initialize`` and the engine's documented calls.

One place, so that a DeepSpeed release that renames one of these breaks one module, and
``tests/runtime/test_ds_adapter.py`` (real engines: ZeRO 0-3, fp16) says which name went away:
- ZeRO-1/2 keep this rank's reduced gradient partitions in ``optimizer.averaged_gradients`` ({group: [tensor]});
- ``engine.checkpoint_engine`` writes every checkpoint file (swapped for one save to guard each write);
- fp16: the loss scale is ``optimizer.loss_scale``, its floor ``engine.dynamic_loss_scale_args()["min_scale"]``;
- ZeRO-3 parameters carry their full size as ``ds_numel``;
- the bf16/fp16 engine casts the module's parameters to 16 bits but leaves its buffers in fp32;
- ``engine.monitor`` (a ``MonitorMaster``: ``enabled``, ``write_events([(name, value, step)])``) feeds the JSON's
  ``tensorboard`` / ``wandb`` / ``csv_monitor`` / ``comet`` blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

MIN_SCALE_KEY = "min_scale"  # deepspeed.runtime.fp16.loss_scaler.MIN_LOSS_SCALE


def gradient_partitions(optimizer: Any) -> list[torch.Tensor]:
    """This rank's reduced gradient partitions under ZeRO-1/2 (empty for other optimizers: ZeRO-0's gradients
    are the parameters' ``.grad``, ZeRO-3 keeps its own)."""
    partitions = getattr(optimizer, "averaged_gradients", None)
    if not isinstance(partitions, dict):
        return []
    return [g for group in partitions.values() for g in (group or []) if isinstance(g, torch.Tensor)]


@contextmanager
def checkpoint_engine_swapped(engine: Any, wrap) -> Iterator[None]:
    """``engine.checkpoint_engine`` replaced by ``wrap(engine.checkpoint_engine)`` for the block."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = wrap(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def is_torch_checkpoint_engine(checkpoint_engine: Any) -> bool:
    """DeepSpeed's default writer (``torch.save``), which can write into an open file."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return type(checkpoint_engine) is TorchCheckpointEngine


def loss_scale(engine: Any) -> float:
    """The fp16 optimizer's current loss scale."""
    return float(engine.optimizer.loss_scale)


def min_loss_scale(engine: Any) -> float | None:
    """The floor of DeepSpeed's dynamic fp16 loss scale (``fp16.min_loss_scale``); None for a static scale."""
    if not engine.dynamic_loss_scale():
        return None
    return float((engine.dynamic_loss_scale_args() or {}).get(MIN_SCALE_KEY, 1.0))


def full_numel(param: torch.nn.Parameter) -> int:
    """A parameter's number of elements, also when ZeRO-3 has partitioned it away (``ds_numel``)."""
    return int(getattr(param, "ds_numel", param.numel()))


def monitor(engine: Any) -> Any | None:
    """The engine's monitor when the JSON enables one of its outputs, else None."""
    master = engine.monitor
    return master if master.enabled else None


def batchnorm_statistics_like_weights(module: torch.nn.Module) -> int:
    """Cast each BatchNorm's running statistics to its (16-bit) weight's dtype; returns how many were cast.

    DeepSpeed's bf16/fp16 engine casts the parameters, not the buffers: a BatchNorm then holds bf16 weights and fp32
    running statistics, and ``batch_norm`` refuses the mix in eval mode (the attacks'; "expected scalar type BFloat16
    but found Float"). Statistics in 16 bits are what a 16-bit model has everywhere else; ``torch_autocast`` keeps
    weights and statistics in fp32.
    """
    cast = 0
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or weight is None or m.running_mean is None:
            continue
        if weight.dtype in (torch.bfloat16, torch.float16) and m.running_mean.dtype != weight.dtype:
            m.running_mean.data = m.running_mean.data.to(weight.dtype)
            m.running_var.data = m.running_var.data.to(weight.dtype)
            cast += 1
    return cast
