"""Normalisation inside the model, so eps is always in pixel units of [0, 1] images."""

from __future__ import annotations

import torch
from torch import nn


class NormalizedModel(nn.Module):
    """``backbone((x - mean) / std)``; ``source`` says where mean/std came from (``models.input_statistics``)."""

    def __init__(self, backbone: nn.Module, mean, std, source: str = "given"):
        super().__init__()
        self.backbone = backbone
        self.source = source
        c = len(mean)
        # Not persistent: the backbone's state dict stays loadable by plain timm/torchvision code.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)

    def describe(self) -> str:
        """``mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5] (model 'x''s timm pretrained_cfg)``, for the log."""
        rounded = lambda t: [round(v, 4) for v in t.flatten().tolist()]  # noqa: E731
        return f"mean {rounded(self.mean)}, std {rounded(self.std)} ({self.source})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        # Under bf16 engines the weights are bf16; the input follows them (its gradient flows back in fp32).
        weight = next(self.backbone.parameters(), None)
        if weight is not None and weight.dtype != z.dtype:
            z = z.to(weight.dtype)
        return self.backbone(z)


class AutocastModule(nn.Module):
    """Runs a module under ``torch.autocast`` so attacks use the same precision as the training forward.

    DeepSpeed's ``torch_autocast`` only wraps ``engine.forward``; attacks call the bare module, so the
    trainer hands them this wrapper. Attribute lookups fall through to the wrapped module.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.module = module
        self.device_type, self.dtype = device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)
