"""SimCLR-style augmentation as batched torch ops (no per-image PIL work, so it keeps up on a CPU).

Random resized crop + horizontal flip through one ``affine_grid``/``grid_sample`` per batch, then a
brightness and contrast jitter; colour images also turn grey with probability ``gray_p``. Defaults are
milder than SimCLR's ImageNet ones because 28x28 grayscale images have little to crop or recolour.
Randomness comes only from ``generator`` (the trainer's per-rank attack generator, so resume is exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, lo: float, hi: float, generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def simclr_augment(x: torch.Tensor, generator: torch.Generator | None = None, *, scale=(0.3, 1.0),
                   ratio=(3 / 4, 4 / 3), flip_p: float = 0.5, brightness: float = 0.3, contrast: float = 0.3,
                   gray_p: float = 0.2) -> torch.Tensor:
    """One random view of each image of ``x`` (B, C, H, W) in [0, 1]; returns the same shape in [0, 1]."""
    b, c, dev = x.shape[0], x.shape[1], x.device
    area = _uniform(b, scale[0], scale[1], generator, dev)
    log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), generator, dev)
    width = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # crop size as a fraction of the image side
    height = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    cx = (2 * torch.rand(b, generator=generator, device=dev) - 1) * (1 - width)  # crop centre in [-1, 1] units
    cy = (2 * torch.rand(b, generator=generator, device=dev) - 1) * (1 - height)
    flip = torch.where(torch.rand(b, generator=generator, device=dev) < flip_p, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shape = (b, 1, 1, 1)
    out = out * _uniform(b, 1 - brightness, 1 + brightness, generator, dev).view(shape).to(x.dtype)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * _uniform(b, 1 - contrast, 1 + contrast, generator, dev).view(shape).to(x.dtype) + mean
    if c == 3 and gray_p > 0:
        weights = torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=x.dtype).view(1, 3, 1, 1)
        gray = (out * weights).sum(dim=1, keepdim=True).expand_as(out)
        to_gray = (torch.rand(b, generator=generator, device=dev) < gray_p).view(shape)
        out = torch.where(to_gray, gray, out)
    return out.clamp(0, 1)


def two_views(x: torch.Tensor, generator: torch.Generator | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return simclr_augment(x, generator, **kwargs), simclr_augment(x, generator, **kwargs)
