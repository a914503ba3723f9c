"""The embedded default: a class-balanced Fashion-MNIST subset vendored with the package.

10,000 training and 2,000 test images (28x28 grayscale), built by ``scripts/build_embedded_data.py``
from the Debian ``dataset-fashion-mnist`` files; MIT licence in ``embedded/LICENSE``. The full data set
(``fashion-mnist-full``) is read from those IDX files when they are installed.
"""

from __future__ import annotations

import gzip
import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..core.errors import ConfigError
from .base import DATASETS, DataSpec

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_FILE = EMBEDDED_DIR / "fashion_mnist_subset.npz"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # installed by `apt-get install dataset-fashion-mnist`

FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Mean/std of the Fashion-MNIST training set, in [0, 1] pixel units.
FASHION_SPEC = DataSpec(in_chans=1, num_classes=10, img_size=28, mean=(0.2860,), std=(0.3530,),
                        classes=FASHION_CLASSES)


class ArrayDataset(TensorDataset):
    """uint8 NHWC/NHW images + int labels held in memory; items are float CHW in [0, 1]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim == 3:
            images = images[..., None]
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        super().__init__(x, y)

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x.float().div_(255), y


def _verify(path: Path) -> None:
    expected = (EMBEDDED_DIR / "fashion_mnist_subset.sha256").read_text().split()[0]
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ConfigError(
            f"embedded data {path.name} fails its checksum (got {actual[:12]}..., want {expected[:12]}...); "
            "reinstall dat-ds or rebuild it with scripts/build_embedded_data.py"
        )


@lru_cache(maxsize=1)
def load_embedded_arrays() -> dict[str, np.ndarray]:
    _verify(EMBEDDED_FILE)
    with np.load(EMBEDDED_FILE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def subset_first(images: np.ndarray, labels: np.ndarray, n: int | None):
    if n is None:
        return images, labels
    if n > len(labels):
        raise ConfigError(f"data.train_subset={n} is larger than the training set ({len(labels)} examples)")
    return images[:n], labels[:n]


@DATASETS.register("fashion-mnist")
def fashion_mnist_embedded(data_cfg, split: str) -> tuple[Dataset, DataSpec]:
    arrays = load_embedded_arrays()
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if split == "train":
        # The file is sorted by source index, so a prefix is roughly class-balanced.
        images, labels = subset_first(images, labels, data_cfg.train_subset)
    return ArrayDataset(images, labels), FASHION_SPEC


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read IDX file {str(path)!r} ({e}); re-download or reinstall it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{str(path)!r} is not a uint8 IDX file; point data.root at the Fashion-MNIST IDX files")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(raw) - offset != count:
        raise ConfigError(f"IDX file {str(path)!r} is truncated or corrupt ({len(raw) - offset} bytes, want {count})")
    # A bytearray, not the bytes object: the array must be writable, since torch.from_numpy shares its memory.
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=offset).reshape(dims)


@DATASETS.register("fashion-mnist-full")
def fashion_mnist_full(data_cfg, split: str) -> tuple[Dataset, DataSpec]:
    root = Path(data_cfg.root) if data_cfg.root else DEBIAN_DIR
    prefix = "train" if split == "train" else "t10k"
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not img_path.exists():
        raise ConfigError(
            f"no Fashion-MNIST IDX files in {str(root)!r}; install them with "
            "`apt-get install dataset-fashion-mnist` or set data.root to their folder"
        )
    images = read_idx(img_path)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if split == "train":
        images, labels = subset_first(images, labels, data_cfg.train_subset)
    return ArrayDataset(images, labels), FASHION_SPEC
