"""``--dry-run`` says how big the data is where headers and file listings tell (no image decoded, no torch),
and says so where they do not, in the words the run logs when it loads the data."""

from __future__ import annotations

import numpy as np
import pytest

from dat_ds.core.config import build_config
from dat_ds.launch import data_sizes
from tests.helpers import fast_cli


def _lines(*overrides: str) -> list[str]:
    cfg = build_config(None, list(overrides))
    return data_sizes.describe(cfg, data_sizes.count(cfg))


def test_dry_run_counts_the_embedded_set_without_torch(tmp_path):
    proc = fast_cli(tmp_path, "train", "--recipe", "demo", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    # the run itself logs "data fashion-mnist: 10000 training images, 10 classes, 1x28x28" and "2000 test images"
    assert "data fashion-mnist: 10000 training images, 2000 test images, 10 classes, 1x28x28\n" in proc.stderr


def test_dry_run_counts_an_image_folder_by_listing_it(tmp_path):
    root = tmp_path / "imgs"
    for split, cls, files in (("train", "cat", ["1.png", "2.JPG", "notes.txt"]), ("train", "dog", ["a/3.jpeg"]),
                              ("train", "eel", []), ("val", "cat", ["4.png"]), ("val", "dog", ["5.webp"])):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for name in files:
            (root / split / cls / name).parent.mkdir(parents=True, exist_ok=True)
            (root / split / cls / name).write_bytes(b"not an image: nothing is decoded")
    proc = fast_cli(tmp_path, "train", "--set", "data.name=imagefolder", "--set", f"data.root={root}",
                    "--set", "data.image_size=64", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"data imagefolder from {root}: 3 training images, 2 test images, 3 classes, 3x64x64\n" in proc.stderr


def test_a_train_subset_larger_than_the_counted_set_is_refused(tmp_path):
    proc = fast_cli(tmp_path, "train", "--recipe", "demo", "--set", "data.train_subset=20000", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: data.train_subset=20000 is larger than the training set (10000 examples)"]


def test_cifar_sizes_from_the_binary_files_sizes_or_the_official_counts(tmp_path):
    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for i in range(1, 6):
        (binary / f"data_batch_{i}.bin").write_bytes(bytes(3073 * i))
    (binary / "test_batch.bin").write_bytes(bytes(3073 * 4))
    assert _lines("data.name=cifar10", f"data.root={binary.parent}", "data.train_subset=10") == [
        f"data cifar10 from {binary.parent}: 10 training images (data.train_subset), 4 test images, 10 classes, 3x32x32"]
    (binary / "test_batch.bin").write_bytes(bytes(3073 * 4 + 1))
    assert "not a whole number of 3073-byte records" in _lines("data.name=cifar10", f"data.root={binary.parent}")[0]

    py = tmp_path / "py" / "cifar-100-python"
    py.mkdir(parents=True)
    (py / "train").touch()
    assert "sizes not counted (test is missing in" in _lines("data.name=cifar100", f"data.root={py}")[0]
    (py / "test").touch()
    assert _lines("data.name=cifar100", f"data.root={py}") == [
        f"data cifar100 from {py}: 50000 training images, 10000 test images, 100 classes, 3x32x32 (the official "
        "release's counts: the pickled batch files are read by the run)"]
    assert "sizes not counted (no cifar-10-batches-py/" in _lines("data.name=cifar10", f"data.root={tmp_path}")[0]


def test_unlabeled_pools_from_their_npy_headers_and_what_is_not_counted(tmp_path):
    pool = tmp_path / "pseudo.npz"
    np.savez(pool, images=np.zeros((7, 28, 28), np.uint8), labels=np.zeros(7, np.int64))
    assert _lines(f"data.unlabeled={pool}")[1] == f"data.unlabeled {pool}: 7 images, 28x28x1"
    shards = tmp_path / "generated"
    shards.mkdir()
    for i, n in enumerate((3, 5)):  # DM-Improves-AT's shards; a compressed one is counted from its header too
        save = np.savez_compressed if i else np.savez
        save(shards / f"{i}.npz", image=np.zeros((n, 32, 32, 3), np.uint8), label=np.zeros(n, np.int64))
    assert _lines(f"data.unlabeled={shards}")[1] == f"data.unlabeled {shards}: 8 images, 32x32x3"
    (tmp_path / "empty.npz").touch()
    assert _lines(f"data.unlabeled={tmp_path / 'empty.npz'}")[1].startswith(
        f"data.unlabeled {tmp_path / 'empty.npz'}: not counted (not a readable .npz (")
    (tmp_path / "rst.pickle").touch()
    assert _lines(f"data.unlabeled={tmp_path / 'rst.pickle'}")[1].endswith(
        "not counted (only .npz pools are counted without loading them)")


@pytest.mark.parametrize("overrides, reason", [
    (["data.name=hf"], "a Hugging Face set is counted only by reading it with `datasets`"),
    (["data.name=fashion-mnist-full", "data.root={tmp}"], "no Fashion-MNIST IDX files in '{tmp}'"),
])
def test_what_cannot_be_counted_cheaply_is_said(tmp_path, overrides, reason):
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    if "data.name=hf" in overrides:
        overrides.append(f"data.root={tmp_path}")
    line = _lines(*overrides)[0]
    assert f"sizes not counted ({reason.replace('{tmp}', str(tmp_path))}; the run counts them" in line


def test_fashion_mnist_full_from_its_idx_headers(tmp_path):
    import gzip

    for prefix, n in (("train", 6), ("t10k", 2)):
        header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + bytes(n * 28 * 28))
    assert _lines("data.name=fashion-mnist-full", f"data.root={tmp_path}") == [
        f"data fashion-mnist-full from {tmp_path}: 6 training images, 2 test images, 10 classes, 1x28x28"]


def test_the_counts_follow_the_data_readers_facts():
    """data_sizes keeps its own copy of the readers' file layouts (they import torch): the same facts."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from dat_ds.data import cifar, embedded, imagefolder

    assert data_sizes.EMBEDDED_FILE == embedded.EMBEDDED_FILE.resolve()
    assert data_sizes.DEBIAN_FASHION == embedded.DEBIAN_DIR
    assert data_sizes.IMAGE_EXTENSIONS == IMG_EXTENSIONS
    for name, lay in cifar.LAYOUTS.items():
        assert data_sizes.CIFAR[name] == (lay.num_classes, lay.py_dir, list(lay.py_train), list(lay.py_test),
                                          lay.bin_dir, lay.bin_label_bytes)
        assert [f"{n}.bin" for n in lay.py_train + lay.py_test] == list(lay.bin_train + lay.bin_test)
    assert data_sizes.CIFAR_PIXELS == cifar.PIXELS
    cfg = build_config(None, ["data.name=imagefolder", "data.root=."])
    assert data_sizes._imagefolder(cfg).image == f"3x{imagefolder.DEFAULT_SIZE}x{imagefolder.DEFAULT_SIZE}"

