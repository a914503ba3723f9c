"""Image transforms: every data set hands the model float CHW tensors in [0, 1].

Normalisation is not here: it lives inside the model (``NormalizedModel``) so attacks work in pixel
units. Augmentation runs only on the training split when ``data.augment`` is on:

- small images (CIFAR-style, side <= 64): random crop with 4 pixels of zero padding + horizontal flip;
- large images (ImageNet-style): RandomResizedCrop + flip for training, Resize(size / 0.875) +
  CenterCrop for evaluation (torchvision reference recipe). Images already at the target size are
  used as they are, so a CIFAR export to ImageFolder gives the same tensors as the CIFAR files.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

SMALL_IMAGE_MAX = 64  # at or below this side length the CIFAR crop-and-flip recipe applies
EVAL_CROP_FRACTION = 0.875  # torchvision reference: resize to 256, center-crop 224

Transform = Callable[[torch.Tensor], torch.Tensor]


def to_tensor(img) -> torch.Tensor:
    """PIL image or HWC/HW uint8 array -> float CHW tensor in [0, 1]."""
    arr = np.array(img)  # a copy: PIL-backed arrays are read-only
    if arr.ndim == 2:
        arr = arr[..., None]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return t.float().div_(255) if t.dtype == torch.uint8 else t.float()


def small_train_transform(size: int, padding: int = 4) -> Transform:
    return v2.Compose([v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()])


def large_train_transform(size: int) -> Transform:
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def large_eval_transform(size: int) -> Transform:
    resize = v2.Compose([v2.Resize(round(size / EVAL_CROP_FRACTION), antialias=True), v2.CenterCrop(size)])

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x if tuple(x.shape[-2:]) == (size, size) else resize(x)

    return apply


def pick_transform(split: str, augment: bool, size: int, native_size: int | None = None) -> Transform | None:
    """The standard transform for ``split``; ``native_size`` is the images' side when known to be uniform.

    Returns None when the images need nothing (already ``size`` x ``size``, no augmentation).
    """
    fit = None if native_size == size else large_eval_transform(size)
    if split == "train" and augment:
        if size <= SMALL_IMAGE_MAX:
            crop = small_train_transform(size)
            return crop if fit is None else v2.Compose([fit, crop])
        return large_train_transform(size)
    return fit


class TransformDataset(Dataset):
    """Applies a tensor transform to the image of every ``(image, label)`` item of ``base``."""

    def __init__(self, base: Dataset, transform: Transform | None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, y


def maybe_transform(dataset: Dataset, transform: Transform | None) -> Dataset:
    return dataset if transform is None else TransformDataset(dataset, transform)
