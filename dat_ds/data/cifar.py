"""CIFAR-10 / CIFAR-100 from a local folder in either official release layout.

``data.root`` is the folder that holds the extracted archive (or the archive folder itself):

- python release: ``cifar-10-batches-py/{data_batch_1..5, test_batch}``,
  ``cifar-100-python/{train, test}``. These are pickle files. A pickle can run code when it is
  loaded, so they are read with a restricted unpickler that only rebuilds plain containers, bytes and
  numpy arrays -- everything the official files contain. Anything else is refused unless
  ``data.trust_pickle=true``.
- binary release (no pickle at all): ``cifar-10-batches-bin/{data_batch_1..5, test_batch}.bin``
  (1 label byte + 3072 pixel bytes per record), ``cifar-100-binary/{train, test}.bin`` (coarse +
  fine label bytes + 3072 pixel bytes).

Images are 32x32 RGB, served as float CHW in [0, 1]; ``data.augment`` adds random crop (padding 4)
and horizontal flip to the training split.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..core.errors import ConfigError
from .base import DATASETS, DataSpec
from .embedded import ArrayDataset, subset_first
from .transforms import maybe_transform, pick_transform

PIXELS = 3 * 32 * 32
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel mean/std of the training sets, in [0, 1] pixel units.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@dataclass(frozen=True)
class CifarLayout:
    num_classes: int
    py_dir: str
    py_train: tuple[str, ...]
    py_test: tuple[str, ...]
    py_label_key: bytes
    bin_dir: str
    bin_train: tuple[str, ...]
    bin_test: tuple[str, ...]
    bin_label_bytes: int  # CIFAR-100 records carry (coarse, fine); the fine label is the last byte
    stats: tuple[tuple[float, ...], tuple[float, ...]]


LAYOUTS = {
    "cifar10": CifarLayout(
        10, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels",
        "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",), 1,
        CIFAR10_STATS),
    "cifar100": CifarLayout(
        100, "cifar-100-python", ("train",), ("test",), b"fine_labels",
        "cifar-100-binary", ("train.bin",), ("test.bin",), 2, CIFAR100_STATS),
}

# What the official python-release pickles reference: numpy array and dtype reconstruction, and
# codecs.encode, which protocol-2 pickles written by Python 3 use for bytes.
_SAFE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_pickle(path: Path, trust: bool) -> dict:
    raw = path.read_bytes()
    try:
        if trust:
            return pickle.loads(raw, encoding="bytes")
        return _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if trust:
            raise ConfigError(f"{str(path)!r} is not a readable pickle ({e}); re-extract the CIFAR archive") from None
        raise ConfigError(
            f"{str(path)!r} references {e}, which the official CIFAR files never do; use the binary release "
            "(cifar-*-bin) or set data.trust_pickle=true if you trust this file"
        ) from None
    except (EOFError, ValueError, TypeError) as e:
        raise ConfigError(f"{str(path)!r} is truncated or not a CIFAR pickle ({type(e).__name__}); re-extract the archive") from None


def _find_dir(root: Path, name: str) -> Path | None:
    for cand in (root / name, root):
        if cand.name == name and cand.is_dir():
            return cand
    return None


def _release_file(folder: Path, fname: str, files: tuple[str, ...], layout: str) -> Path:
    path = folder / fname
    if not path.is_file():
        raise ConfigError(f"missing {fname} in {str(folder)!r}; expected the {layout} release layout "
                          f"({folder.name}/{', '.join(files)})")
    return path


def _read_python(folder: Path, files: tuple[str, ...], label_key: bytes, trust: bool) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for fname in files:
        path = _release_file(folder, fname, files, "python")
        batch = load_pickle(path, trust)
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise ConfigError(f"{str(path)!r} lacks the b'data'/{label_key!r} entries of a CIFAR batch; re-extract the archive")
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
            raise ConfigError(f"{str(path)!r} holds images of shape {data.shape} ({data.dtype}); "
                              f"CIFAR batches are N x {PIXELS} uint8 (32x32 RGB)")
        images.append(data)
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _read_binary(folder: Path, files: tuple[str, ...], label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    record = label_bytes + PIXELS
    images, labels = [], []
    for fname in files:
        path = _release_file(folder, fname, files, "binary")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise ConfigError(f"{str(path)!r} has {raw.size} bytes, not a multiple of the {record}-byte CIFAR record; "
                              "re-extract the archive")
        rows = raw.reshape(-1, record)
        labels.append(rows[:, label_bytes - 1].astype(np.int64))
        images.append(rows[:, label_bytes:])
    return np.concatenate(images), np.concatenate(labels)


def read_cifar(name: str, root: str | Path | None, split: str, trust_pickle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 NHWC images, int64 labels) of ``split`` from whichever release layout is present."""
    lay = LAYOUTS[name]
    expected = (f"{lay.py_dir}/ ({', '.join(lay.py_train + lay.py_test)}) or "
                f"{lay.bin_dir}/ ({', '.join(lay.bin_train + lay.bin_test)})")
    if root is None:
        raise ConfigError(f"data.root is not set; point it at the folder holding {expected}")
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data.root {str(root)!r} is not a folder; point it at the folder holding {expected}")
    train = split == "train"
    if (folder := _find_dir(root, lay.py_dir)) is not None:
        flat, labels = _read_python(folder, lay.py_train if train else lay.py_test, lay.py_label_key, trust_pickle)
    elif (folder := _find_dir(root, lay.bin_dir)) is not None:
        flat, labels = _read_binary(folder, lay.bin_train if train else lay.bin_test, lay.bin_label_bytes)
    else:
        raise ConfigError(f"no CIFAR files under {str(root)!r}; expected {expected}")
    if len(flat) != len(labels):
        raise ConfigError(f"{str(folder)!r} has {len(flat)} images but {len(labels)} labels; re-extract the archive")
    if len(labels) == 0:
        raise ConfigError(f"{str(folder)!r} holds no {split} images; expected {expected}")
    bad = (labels < 0) | (labels >= lay.num_classes)
    if bad.any():
        raise ConfigError(f"{str(folder)!r} has label {int(labels[bad][0])} outside 0..{lay.num_classes - 1}; "
                          f"is this {name} (data.name) or the other CIFAR?")
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _class_names(name: str, root: Path) -> tuple[str, ...]:
    if name == "cifar10":
        return CIFAR10_CLASSES
    for cand in (root / "cifar-100-binary" / "fine_label_names.txt", root / "fine_label_names.txt"):
        if cand.is_file():
            return tuple(line.strip() for line in cand.read_text().splitlines() if line.strip())
    return tuple(str(i) for i in range(100))


def _cifar(name: str):
    lay = LAYOUTS[name]

    def build(data_cfg, split: str) -> tuple[Dataset, DataSpec]:
        images, labels = read_cifar(name, data_cfg.root, split, data_cfg.trust_pickle)
        if split == "train":
            images, labels = subset_first(images, labels, data_cfg.train_subset)
        spec = DataSpec(in_chans=3, num_classes=lay.num_classes, img_size=32, mean=lay.stats[0], std=lay.stats[1],
                        classes=_class_names(name, Path(data_cfg.root)))
        dataset = ArrayDataset(images, labels)
        return maybe_transform(dataset, pick_transform(split, data_cfg.augment, 32, 32)), spec

    build.__name__ = name
    return build


for _name in LAYOUTS:
    DATASETS.register(_name)(_cifar(_name))
