"""On-disk data formats read the same images: CIFAR python/binary releases, HF save_to_disk/parquet, ImageFolder.

Fixture: the 20 real CIFAR-10 test images (and 20 CIFAR-100 ones) that the ``foolbox`` wheel ships as
PNGs (``foolbox/data/cifar10_<index>_<label>.png``), written by the tests into every layout.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from dat_ds.core.config import DataConfig, replace
from dat_ds.core.errors import ConfigError
from dat_ds.data import DATASETS, build_dataset
from tests.helpers import CIFAR10_CLASSES, foolbox_images, write_hf, write_python_release


def write_binary_release(root: Path, images: np.ndarray, labels: np.ndarray, cifar100: bool = False) -> Path:
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    label_cols = [np.zeros_like(labels), labels] if cifar100 else [labels]
    records = np.concatenate([np.stack(label_cols, 1).astype(np.uint8), flat], axis=1)
    if cifar100:
        folder, parts = root / "cifar-100-binary", {"train.bin": slice(None), "test.bin": slice(None)}
    else:
        folder = root / "cifar-10-batches-bin"
        parts = {f"data_batch_{i + 1}.bin": slice(4 * i, 4 * i + 4) for i in range(5)} | {"test_batch.bin": slice(None)}
    folder.mkdir(parents=True)
    for name, sl in parts.items():
        records[sl].tofile(folder / name)
    return folder


def write_imagefolder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c in CIFAR10_CLASSES:  # every class folder, also the ones without fixture images
            (root / "imagefolder" / split / c).mkdir(parents=True)
        for i, (im, y) in enumerate(zip(images, labels)):
            Image.fromarray(im).save(root / "imagefolder" / split / CIFAR10_CLASSES[y] / f"{i:02d}.png")


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    images, labels = foolbox_images("cifar10")
    assert images.shape == (20, 32, 32, 3)
    write_python_release(root / "py", images, labels)
    write_binary_release(root / "bin", images, labels)
    write_hf(root, images, labels)
    write_imagefolder(root, images, labels)
    images100, labels100 = foolbox_images("cifar100")
    write_python_release(root / "py100", images100, labels100, cifar100=True)
    write_binary_release(root / "bin100", images100, labels100, cifar100=True)
    return root, images, labels


def _all(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys])


def _sorted_items(x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, bytes]]:
    return sorted((int(label), img.numpy().tobytes()) for img, label in zip(x, y))


def test_on_disk_formats_are_registered():
    for name in ("cifar10", "cifar100", "hf", "imagefolder"):
        assert name in DATASETS


@pytest.mark.parametrize("split", ["train", "test"])
def test_all_formats_give_the_same_tensors(fixture_root, split):
    root, images, labels = fixture_root
    expected_x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    expected_y = torch.from_numpy(labels)
    cfgs = {"cifar-python": DataConfig(name="cifar10", root=str(root / "py")),
            "cifar-python-inner": DataConfig(name="cifar10", root=str(root / "py" / "cifar-10-batches-py")),
            "cifar-binary": DataConfig(name="cifar10", root=str(root / "bin")),
            "hf-save_to_disk": DataConfig(name="hf", root=str(root / "hf_disk")),
            "hf-parquet": DataConfig(name="hf", root=str(root / "hf_parquet")),
            "imagefolder": DataConfig(name="imagefolder", root=str(root / "imagefolder"), image_size=32)}
    for fmt, cfg in cfgs.items():
        ds, spec = build_dataset(cfg, split)
        x, y = _all(ds)
        assert (spec.in_chans, spec.num_classes, spec.img_size) == (3, 10, 32), fmt
        assert x.dtype == torch.float32 and y.dtype == torch.int64, fmt
        if fmt == "imagefolder":  # ImageFolder lists class by class: same items, other order
            assert spec.classes == CIFAR10_CLASSES
            assert _sorted_items(x, y) == _sorted_items(expected_x, expected_y), fmt
        else:
            assert torch.equal(x, expected_x), fmt
            assert torch.equal(y, expected_y), fmt
        assert spec.mean == pytest.approx((0.4914, 0.4822, 0.4465)), fmt  # CIFAR-10 statistics for every copy


def test_cifar100_python_and_binary_agree(fixture_root):
    root, _, _ = fixture_root
    images, labels = foolbox_images("cifar100")
    for sub in ("py100", "bin100"):
        ds, spec = build_dataset(DataConfig(name="cifar100", root=str(root / sub)), "train")
        x, y = _all(ds)
        assert spec.num_classes == 100
        assert torch.equal(y, torch.from_numpy(labels))
        assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


def test_train_subset_takes_a_prefix(fixture_root):
    root, _, labels = fixture_root
    ds, _ = build_dataset(DataConfig(name="cifar10", root=str(root / "bin"), train_subset=7), "train")
    assert len(ds) == 7 and torch.equal(_all(ds)[1], torch.from_numpy(labels[:7]))
    ds, _ = build_dataset(DataConfig(name="hf", root=str(root / "hf_disk"), train_subset=5), "train")
    assert len(ds) == 5


def test_cifar_augmentation_crops_and_flips_train_only(fixture_root):
    root, images, _ = fixture_root
    plain = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    cfg = DataConfig(name="cifar10", root=str(root / "py"), augment=True)
    torch.manual_seed(0)
    x, _ = _all(build_dataset(cfg, "train")[0])
    assert x.shape == plain.shape and 0.0 <= x.min() and x.max() <= 1.0
    changed = [not torch.equal(a, b) for a, b in zip(x, plain)]
    assert sum(changed) >= 10  # crop offsets/flips are random; nearly every image moves
    # a crop of the zero-padded image: every augmented image's non-padding pixels come from the original
    for a, b in zip(x, plain):
        candidates = [b, b.flip(-1)]
        padded = [torch.nn.functional.pad(c, (4, 4, 4, 4)) for c in candidates]
        assert any(torch.equal(a, p[:, i:i + 32, j:j + 32]) for p in padded for i in range(9) for j in range(9))
    x_test, _ = _all(build_dataset(cfg, "test")[0])
    assert torch.equal(x_test, plain)  # evaluation is never augmented


def test_imagenet_style_transforms_resize_and_crop(fixture_root):
    root, _, _ = fixture_root
    cfg = DataConfig(name="imagefolder", root=str(root / "imagefolder"), image_size=24)
    x, _ = _all(build_dataset(cfg, "test")[0])
    assert x.shape == (20, 3, 24, 24)  # Resize(27) + CenterCrop(24)
    torch.manual_seed(0)
    x_train, _ = _all(build_dataset(replace(cfg, augment=True), "train")[0])
    assert x_train.shape == (20, 3, 24, 24)  # RandomResizedCrop(24)
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    ds, spec = build_dataset(DataConfig(name="hf", root=str(root / "hf_disk"), image_size=24), "test")
    assert spec.img_size == 24 and ds[0][0].shape == (3, 24, 24)


def test_loader_workers_give_the_same_batches(fixture_root):
    root, _, _ = fixture_root
    ds, _ = build_dataset(DataConfig(name="hf", root=str(root / "hf_disk")), "train")
    batches = [torch.cat([x for x, _ in torch.utils.data.DataLoader(ds, batch_size=8, num_workers=w)])
               for w in (0, 2)]
    assert torch.equal(batches[0], batches[1])


# ----------------------------------------------------------------------------- clear errors


def _error(cfg: DataConfig, split: str = "train") -> str:
    with pytest.raises(ConfigError) as e:
        build_dataset(cfg, split)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_wrong_or_empty_folders_name_the_expected_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "cifar-10-batches-py" in _error(DataConfig(name="cifar10", root=str(tmp_path / "empty")))
    assert "cifar-100-python" in _error(DataConfig(name="cifar100", root=str(tmp_path / "empty")))
    assert "data.root is not set" in _error(DataConfig(name="cifar10"))
    assert "save_to_disk" in _error(DataConfig(name="hf", root=str(tmp_path / "empty")))
    assert "root/train/<class>" in _error(DataConfig(name="imagefolder", root=str(tmp_path / "empty")))
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    assert "no images" in _error(DataConfig(name="imagefolder", root=str(tmp_path / "empty")))
    (tmp_path / "partial" / "cifar-10-batches-bin").mkdir(parents=True)
    assert "data_batch_1.bin" in _error(DataConfig(name="cifar10", root=str(tmp_path / "partial")))


def test_wrong_shapes_and_labels_are_reported(fixture_root, tmp_path):
    _, images, labels = fixture_root
    folder = write_python_release(tmp_path / "gray", images, labels)
    batch = {b"data": np.zeros((4, 1024), np.uint8), b"labels": [0, 1, 2, 3]}  # 32x32 grayscale rows
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch))
    assert "32x32 RGB" in _error(DataConfig(name="cifar10", root=str(tmp_path / "gray")))
    bad = labels.copy()
    bad[3] = 12
    write_binary_release(tmp_path / "badlabel", images, bad)
    msg = _error(DataConfig(name="cifar10", root=str(tmp_path / "badlabel")), "test")
    assert "label 12" in msg and "0..9" in msg
    truncated = tmp_path / "trunc" / "cifar-10-batches-bin"
    write_binary_release(tmp_path / "trunc", images, labels)
    (truncated / "test_batch.bin").write_bytes((truncated / "test_batch.bin").read_bytes()[:-5])
    assert "3073-byte" in _error(DataConfig(name="cifar10", root=str(tmp_path / "trunc")), "test")


class _Boom:
    """Unpickling this would run ``sorted`` -- any callable a hostile file names gets run."""

    def __reduce__(self):
        return (sorted, ([3, 1, 2],))


def test_pickles_outside_the_cifar_format_are_refused_unless_trusted(fixture_root, tmp_path):
    _, images, labels = fixture_root
    folder = write_python_release(tmp_path / "evil", images, labels)
    batch = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    (folder / "test_batch").write_bytes(pickle.dumps({**batch, b"extra": _Boom()}))
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "evil"))
    msg = _error(cfg, "test")
    assert "builtins.sorted" in msg and "trust_pickle" in msg
    ds, _ = build_dataset(replace(cfg, trust_pickle=True), "test")  # the user vouched for the file
    assert len(ds) == 20
    # An OrderedDict is harmless but still not what the official files hold: refused, then trusted.
    (folder / "test_batch").write_bytes(pickle.dumps(OrderedDict(batch)))
    assert "collections.OrderedDict" in _error(cfg, "test")
    assert len(build_dataset(replace(cfg, trust_pickle=True), "test")[0]) == 20


def test_imagefolder_val_missing_a_class_keeps_train_numbering(fixture_root, tmp_path):
    import shutil

    root, _, _ = fixture_root
    shutil.copytree(root / "imagefolder", tmp_path / "inet")
    shutil.rmtree(tmp_path / "inet" / "val" / "airplane")  # index 0 in train/
    ds, spec = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "inet"), image_size=32), "test")
    _, y = _all(ds)
    assert spec.num_classes == 10 and spec.classes == CIFAR10_CLASSES
    assert sorted(y.tolist()) == sorted(label for label in fixture_root[2].tolist() if label != 0)
    (tmp_path / "inet" / "val" / "unicorn").mkdir()
    assert "unicorn" in _error(DataConfig(name="imagefolder", root=str(tmp_path / "inet"), image_size=32), "test")


def test_fashion_mnist_idx_files_load_writable_without_warnings(tmp_path):
    """IDX files are decoded into writable memory: torch shares it, and warns (once, loudly) about read-only arrays."""
    import warnings

    from tests.helpers import idx_root

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), rng.integers(0, 10, 16).astype(np.uint8)
    root = idx_root(tmp_path, images, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds, spec = DATASETS.get("fashion-mnist-full")(DataConfig(name="fashion-mnist-full", root=str(root)), "train")
    x, y = ds[3]
    assert spec.img_size == 28 and x.shape == (1, 28, 28) and int(y) == int(labels[3])
    assert torch.equal(x, torch.from_numpy(images[3].astype(np.float32) / 255)[None])
