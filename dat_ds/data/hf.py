"""Hugging Face ``datasets`` data read from local files (no hub access): ``data.name: hf``.

``data.root`` may be:

- a ``DatasetDict`` written by ``save_to_disk`` (``dataset_dict.json`` + one folder per split), or a
  folder holding one ``save_to_disk`` folder per split (``train/``, ``test/``);
- parquet or arrow files of a hub data set, e.g. a local copy of ``uoft-cs/cifar10``
  (``plain_text/train-00000-of-00001.parquet``): files whose name starts with the split (or that sit
  in a folder named after it). Parquet is read into memory, so very large sets (ImageNet) should be
  saved with ``save_to_disk`` (memory-mapped) or used as an ImageFolder.

The test split is ``test``, else ``validation``/``val``. The image column is the one with an
``Image`` feature, else ``img``/``image``; the label column is the ``ClassLabel`` one, else
``label``/``fine_label``/``labels``. Images come out as float CHW in [0, 1]; grayscale sets stay one
channel, everything else is converted to RGB.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.errors import ConfigError
from .base import DATASETS, DataSpec
from .corrupt import CorruptImages
from .transforms import pick_transform, to_tensor

IMAGE_COLUMNS = ("img", "image", "pixel_values")
LABEL_COLUMNS = ("label", "fine_label", "labels")
TEST_SPLITS = ("test", "validation", "val")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LAYOUT_HINT = ("expected a save_to_disk folder (dataset_dict.json, or train/ and test/ save_to_disk folders) "
               "or train-*/test-* parquet/arrow files")


def default_stats(in_chans: int, img_size: int, num_classes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation constants for a data set we only know by its shape (the model wrapper applies them)."""
    from .cifar import CIFAR10_STATS, CIFAR100_STATS

    if in_chans == 1:
        return (0.5,), (0.5,)
    if img_size == 32 and num_classes == 10:
        return CIFAR10_STATS
    if img_size == 32 and num_classes == 100:
        return CIFAR100_STATS
    return IMAGENET_STATS


def _split_names(split: str) -> tuple[str, ...]:
    return ("train",) if split == "train" else TEST_SPLITS


def _files_for(root: Path, names: tuple[str, ...]) -> list[Path]:
    for name in names:
        found = []
        for ext in ("parquet", "arrow"):
            for f in sorted(root.rglob(f"*.{ext}")):
                if f.name.startswith(f"{name}-") or f.name.startswith(f"{name}.") or f.parent.name == name:
                    found.append(f)
        if found:
            return found
    return []


@lru_cache(maxsize=8)
def load_split(root: str, split: str):
    """The ``datasets.Dataset`` for ``split`` under ``root`` (cached: train and test share the work)."""
    import datasets

    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"data.root {root!r} is not a folder; {LAYOUT_HINT}")
    names = _split_names(split)
    if (base / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(base))
        for name in names:
            if name in dd:
                return dd[name]
        raise ConfigError(f"{root!r} has splits {sorted(dd)}, none of {list(names)}; save the data set with a "
                          f"{names[0]!r} split")
    for name in names:
        if (base / name / "state.json").is_file():
            return datasets.load_from_disk(str(base / name))
    if (base / "state.json").is_file():
        raise ConfigError(f"{root!r} is a single save_to_disk Dataset; save a DatasetDict with train and test splits "
                          "(DatasetDict({'train': ..., 'test': ...}).save_to_disk(root))")
    files = _files_for(base, names)
    if not files:
        raise ConfigError(f"no {names[0]} split found under {root!r}; {LAYOUT_HINT}")
    folders = sorted({str(f.parent.relative_to(base)) for f in files})
    if len(folders) > 1:  # e.g. a save_to_disk copy next to a parquet copy: both would be read, each example twice
        raise ConfigError(f"{root!r} holds {split} files in {len(folders)} folders ({', '.join(folders[:3])}): more than "
                          f"one copy or configuration of the data set; point data.root at the one to use")
    parts = []
    for f in files:
        if f.suffix == ".arrow":
            parts.append(datasets.Dataset.from_file(str(f)))
        else:
            import pyarrow.parquet as pq
            from datasets.table import InMemoryTable

            parts.append(datasets.Dataset(InMemoryTable(pq.read_table(f))))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _pick_columns(ds, root: str) -> tuple[str, str]:
    import datasets

    feats = ds.features
    image_col = next((c for c, f in feats.items() if isinstance(f, datasets.Image)), None)
    image_col = image_col or next((c for c in IMAGE_COLUMNS if c in feats), None)
    label_col = next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    label_col = label_col or next((c for c in LABEL_COLUMNS if c in feats), None)
    if image_col is None or label_col is None:
        raise ConfigError(f"{root!r} has columns {list(feats)}; need an image column ({'/'.join(IMAGE_COLUMNS)}) "
                          f"and a label column ({'/'.join(LABEL_COLUMNS)})")
    return image_col, label_col


def _decode(value):
    if isinstance(value, dict) and value.get("bytes") is not None:  # undecoded Image struct
        import PIL.Image

        return PIL.Image.open(io.BytesIO(value["bytes"]))
    return value


def _as_mode(img, mode: str):
    if hasattr(img, "convert"):  # PIL
        return img if img.mode == mode else img.convert(mode)
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ConfigError(f"image column holds {arr.dtype} arrays; store uint8 images (or an Image feature)")
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    return arr


class HFImageDataset(Dataset):
    """Rows -> float CHW in [0, 1]; an image that does not decode aborts naming it or is replaced and counted
    (``data.on_corrupt``, ``data.corrupt``). ``where``: the split and root, for those messages."""

    def __init__(self, ds, image_col: str, label_col: str, mode: str, transform, on_corrupt: str = "abort",
                 where: str = "the data set"):
        self.ds, self.image_col, self.label_col = ds, image_col, label_col
        self.mode, self.transform, self.where = mode, transform, where
        self.corrupt = CorruptImages(len(ds), on_corrupt, self._describe)

    def __len__(self) -> int:
        return len(self.ds)

    def _describe(self, i: int) -> str:
        """Example ``i`` and, where the image column keeps one, its file's path."""
        path = None
        try:
            import datasets

            raw = self.ds.cast_column(self.image_col, datasets.Image(decode=False))[int(i)][self.image_col]
            path = raw.get("path") if isinstance(raw, dict) else None
        except Exception:  # noqa: BLE001 - only for the message: not an Image column, or no path stored
            pass
        return f"example {i} of {self.where}" + (f" ({path!r})" if path else "")

    def __getitem__(self, i: int):
        return self.corrupt.load(int(i), self._read)

    def _read(self, i: int):
        row = self.ds[int(i)]
        x = to_tensor(_as_mode(_decode(row[self.image_col]), self.mode))
        want = 1 if self.mode == "L" else 3
        if x.shape[0] != want:
            raise ConfigError(f"example {i} has {x.shape[0]} channels, the data set {want}; store consistent images")
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.tensor(int(row[self.label_col]))


def _labels(ds, label_col: str) -> np.ndarray:
    return np.asarray(ds[label_col], dtype=np.int64)


@DATASETS.register("hf")
def hf_dataset(data_cfg, split: str) -> tuple[Dataset, DataSpec]:
    import datasets

    if data_cfg.root is None:
        raise ConfigError(f"data.root is not set for data.name=hf; {LAYOUT_HINT}")
    root = str(data_cfg.root)
    ds = load_split(root, split)
    train = ds if split == "train" else load_split(root, "train")
    image_col, label_col = _pick_columns(ds, root)
    if split == "train" and data_cfg.train_subset is not None:
        if data_cfg.train_subset > len(ds):
            raise ConfigError(f"data.train_subset={data_cfg.train_subset} is larger than the training set ({len(ds)} examples)")
        ds = ds.select(range(data_cfg.train_subset))
    if len(ds) == 0:
        raise ConfigError(f"the {split} split under {root!r} is empty; {LAYOUT_HINT}")
    feature = train.features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        num_classes, classes = feature.num_classes, tuple(feature.names)
    else:
        num_classes, classes = int(_labels(train, label_col).max()) + 1, ()
    labels = _labels(ds, label_col)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ConfigError(f"the {split} split under {root!r} has label {int(labels[bad][0])} outside 0..{num_classes - 1}; "
                          "fix the labels or the label column")
    first = _decode(ds[0][image_col])
    mode = "L" if getattr(first, "mode", None) == "L" or np.asarray(first).ndim == 2 else "RGB"
    native = to_tensor(_as_mode(first, mode)).shape[-2:]
    native_size = native[0] if native[0] == native[1] else None
    size = data_cfg.image_size or native_size or 224
    in_chans = 1 if mode == "L" else 3
    mean, std = default_stats(in_chans, size, num_classes)
    spec = DataSpec(in_chans=in_chans, num_classes=num_classes, img_size=size, mean=mean, std=std, classes=classes)
    transform = pick_transform(split, data_cfg.augment, size)  # resizes only images not already at size
    return HFImageDataset(ds, image_col, label_col, mode, transform, data_cfg.on_corrupt,
                          f"the {split} split under {root!r}"), spec
