"""ImageNet-style folders: ``data.name: imagefolder``.

Layout under ``data.root``: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (``test/`` is accepted
for the evaluation split too), read with torchvision's ``ImageFolder``; class indices follow the
sorted class-folder names of ``train/``. Images are converted to RGB. ``data.image_size`` (default
224) is the crop: RandomResizedCrop + flip for training with ``data.augment``, Resize + CenterCrop
for evaluation; images already at that size are used as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.errors import ConfigError
from .base import DATASETS, DataSpec
from .corrupt import CorruptImages
from .transforms import pick_transform, to_tensor

log = logging.getLogger(__name__)

DEFAULT_SIZE = 224
LAYOUT = "root/train/<class>/*.jpg and root/val/<class>/*.jpg"


class FolderDataset(Dataset):
    """torchvision ImageFolder -> float CHW in [0, 1], resized/cropped by ``transform``; an image that does
    not decode aborts with its path or is replaced and counted (``data.on_corrupt``, ``data.corrupt``)."""

    def __init__(self, folder, transform, on_corrupt: str = "abort"):
        self.folder, self.transform = folder, transform
        self.corrupt = CorruptImages(len(folder), on_corrupt, lambda j: repr(self.folder.samples[j][0]))

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        img, label = self.corrupt.load(i, self.folder.__getitem__)
        x = to_tensor(img)
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.tensor(label)


def _split_dir(root: Path, split: str) -> Path:
    names = ("train",) if split == "train" else ("val", "test", "validation")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise ConfigError(f"no {names[0]}/ folder under {str(root)!r}; expected {LAYOUT}")


def _open(folder: Path):
    from torchvision.datasets import ImageFolder

    try:
        # allow_empty: an empty class folder keeps its index, so labels match the folder names' order
        folder_ds = ImageFolder(str(folder), loader=_rgb_loader, allow_empty=True)
    except FileNotFoundError as e:
        raise ConfigError(f"{str(folder)!r} has no class folders ({e}); expected {LAYOUT}") from None
    if not folder_ds.samples:
        raise ConfigError(f"{str(folder)!r} has class folders but no images (.jpg/.png/...); expected {LAYOUT}")
    counts = np.bincount([y for _, y in folder_ds.samples], minlength=len(folder_ds.classes))
    if (counts == 0).any():
        log.warning("%s: %d of %d class folders are empty (e.g. %r)", folder, int((counts == 0).sum()),
                    len(counts), folder_ds.classes[int(np.argmin(counts))])
    return folder_ds


def _rgb_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


@DATASETS.register("imagefolder")
def imagefolder(data_cfg, split: str) -> tuple[Dataset, DataSpec]:
    if data_cfg.root is None:
        raise ConfigError(f"data.root is not set for data.name=imagefolder; expected {LAYOUT}")
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data.root {str(root)!r} is not a folder; expected {LAYOUT}")
    train = _open(_split_dir(root, "train"))
    folder = train if split == "train" else _open(_split_dir(root, split))
    if folder.classes != train.classes:
        extra = sorted(set(folder.classes) - set(train.classes))
        if extra:
            raise ConfigError(f"{str(_split_dir(root, split))!r} has class folders not in train/ (e.g. {extra[0]!r}); "
                              "both splits need the same class folders")
        index = {c: i for i, c in enumerate(train.classes)}  # a split missing a class keeps train's numbering
        folder.samples = [(p, index[folder.classes[y]]) for p, y in folder.samples]
        folder.targets = [y for _, y in folder.samples]
        folder.classes, folder.class_to_idx = train.classes, train.class_to_idx
    if split == "train" and data_cfg.train_subset is not None:
        if data_cfg.train_subset > len(folder):
            raise ConfigError(f"data.train_subset={data_cfg.train_subset} is larger than the training set ({len(folder)} images)")
        # ImageFolder lists class by class, so a prefix would hold few classes: take a strided subset.
        step = len(folder) / data_cfg.train_subset
        folder.samples = [folder.samples[int(i * step)] for i in range(data_cfg.train_subset)]
        folder.targets = [y for _, y in folder.samples]
    size = data_cfg.image_size or DEFAULT_SIZE
    from .hf import default_stats

    mean, std = default_stats(3, size, len(train.classes))
    spec = DataSpec(in_chans=3, num_classes=len(train.classes), img_size=size, mean=mean, std=std,
                    classes=tuple(train.classes))
    return FolderDataset(folder, pick_transform(split, data_cfg.augment, size), data_cfg.on_corrupt), spec
