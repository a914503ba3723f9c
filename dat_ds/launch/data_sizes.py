"""What ``--dry-run`` says about the data's size: only what it can count without decoding an image and without
torch or numpy (the dry run imports neither).

Counted from headers and file listings: the embedded subset and ``.npz`` pools from the ``.npy`` headers inside
the archive, Fashion-MNIST IDX files from their header, the CIFAR binary release from its files' sizes (one record
per image), an ImageFolder by listing its class folders. The CIFAR python release is pickles, which only numpy can
read: its sizes are the official release's, named as such. Hugging Face sets, plugins' data sets and pickled pools
are not counted; the line says so instead of guessing. The real run logs the sizes it loaded in the same words
(``runtime.build``, ``evaluation.training``).
"""

from __future__ import annotations

import ast
import gzip
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.config import RunConfig
from ..core.errors import ConfigError

# Facts of the data readers in dat_ds/data/ (which import numpy and torch, so not imported here);
# tests/cli/test_dry_run_sizes.py checks that both say the same.
# dat_ds/data/embedded.py reads the same file
EMBEDDED_FILE = Path(__file__).resolve().parents[1] / "data" / "embedded" / "fashion_mnist_subset.npz"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # fashion-mnist-full's default, as data/embedded.py
# torchvision's ImageFolder takes these (torchvision.datasets.folder.IMG_EXTENSIONS), any letter case
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# CIFAR: (classes, python folder, train files, test files, binary folder, label bytes per record); data/cifar.py
CIFAR = {"cifar10": (10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                     "cifar-10-batches-bin", 1),
         "cifar100": (100, "cifar-100-python", ["train"], ["test"], "cifar-100-binary", 2)}
CIFAR_OFFICIAL = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}  # images per split, as released
CIFAR_PIXELS = 3 * 32 * 32
MAX_NPY_HEADER = 65_536  # numpy's own reader refuses far smaller ones


@dataclass(frozen=True)
class DataSizes:
    """What the dry run could count; None with ``why`` where it could not."""

    train: int | None  # after data.train_subset, as the run logs it
    test: int | None
    classes: int | None
    image: str | None  # CxHxW, where known without decoding
    why: str = ""  # why train/test are None
    official: bool = False  # the CIFAR python release: the official counts, the files not read
    unlabeled: int | None = None
    unlabeled_image: str | None = None  # HxWxC, as the pool stores it
    unlabeled_why: str = ""


def npy_shape(archive: zipfile.ZipFile, member: str) -> tuple[int, ...]:
    """The shape in the ``.npy`` header of ``member`` (format 1.0-3.0): a few hundred bytes, no array read."""
    with archive.open(member) as f:
        head = f.read(8)
        if len(head) < 8 or head[:6] != b"\x93NUMPY":
            raise ValueError(f"{member} is not a .npy array")
        width = 2 if head[6] == 1 else 4
        length = int.from_bytes(f.read(width), "little")
        if length > MAX_NPY_HEADER:
            raise ValueError(f"{member} has a {length}-byte header")
        header = ast.literal_eval(f.read(length).decode("latin1"))
    shape = header["shape"] if isinstance(header, dict) else None
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{member} has no array shape in its header")
    return shape


def _npz_shapes(path: Path, *members: str) -> list[tuple[int, ...]]:
    with zipfile.ZipFile(path) as z:
        return [npy_shape(z, f"{m}.npy") for m in members]


def _chw(shape: tuple[int, ...]) -> str:
    """CxHxW of NHW / NHWC image arrays."""
    h, w, c = (*shape[1:3], shape[3] if len(shape) == 4 else 1)
    return f"{c}x{h}x{w}"


def _idx_dims(path: Path) -> tuple[int, ...]:
    """The dimensions in an IDX file's header (gzip or not): 4 + 4 x ndim bytes."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:3] != b"\x00\x00\x08":
            raise ValueError(f"{path.name} is not a uint8 IDX file")
        raw = f.read(4 * head[3])
    return tuple(int.from_bytes(raw[4 * i: 4 * i + 4], "big") for i in range(head[3]))


def _files_per_class(split_dir: Path) -> dict[str, int]:
    """Image files per class folder, as torchvision's ImageFolder lists them (names only, nothing opened)."""
    counts = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir():
            counts[entry.name] = sum(name.lower().endswith(IMAGE_EXTENSIONS)
                                     for _, _, names in os.walk(entry.path, followlinks=True) for name in names)
    return counts


def _subset(n: int, cfg: RunConfig) -> int:
    """The training images the run keeps (``data.train_subset``): it refuses a subset larger than the set."""
    subset = cfg.data.train_subset
    if subset is not None and subset > n:
        raise ConfigError(f"data.train_subset={subset} is larger than the training set ({n} examples)")
    return n if subset is None else subset


def _labeled(cfg: RunConfig) -> DataSizes:
    data, unknown = cfg.data, None
    try:
        if data.name == "fashion-mnist":
            train, test = _npz_shapes(EMBEDDED_FILE, "train_images", "test_images")
            return DataSizes(_subset(train[0], cfg), test[0], 10, _chw(train))
        if data.name == "fashion-mnist-full":
            root = Path(data.root) if data.root else DEBIAN_FASHION
            train, test = (root / "train-images-idx3-ubyte.gz", root / "t10k-images-idx3-ubyte.gz")
            if not (train.is_file() and test.is_file()):
                return DataSizes(None, None, 10, "1x28x28", why=f"no Fashion-MNIST IDX files in {str(root)!r}")
            train_dims, test_dims = _idx_dims(train), _idx_dims(test)
            return DataSizes(_subset(train_dims[0], cfg), test_dims[0], 10, f"1x{train_dims[1]}x{train_dims[2]}")
        if data.name in CIFAR:
            return _cifar(cfg)
        if data.name == "imagefolder":
            return _imagefolder(cfg)
        unknown = ("a Hugging Face set is counted only by reading it with `datasets`" if data.name == "hf" else
                   f"{data.name} comes from a plugin")
    except ConfigError:
        raise
    except (OSError, ValueError, SyntaxError, KeyError, zipfile.BadZipFile, EOFError) as e:
        unknown = f"its files could not be read cheaply: {e}"
    return DataSizes(None, None, None, None, why=unknown)


def _cifar(cfg: RunConfig) -> DataSizes:
    classes, py_dir, py_train, py_test, bin_dir, label_bytes = CIFAR[cfg.data.name]
    root = Path(cfg.data.root)
    folders = [root / name for name in (py_dir, bin_dir)] + [root]
    py = next((f for f in folders if f.name == py_dir and f.is_dir()), None)
    binary = next((f for f in folders if f.name == bin_dir and f.is_dir()), None)
    if py is not None:
        missing = [name for name in py_train + py_test if not (py / name).is_file()]
        if missing:
            return DataSizes(None, None, classes, "3x32x32", why=f"{missing[0]} is missing in {str(py)!r}")
        train, test = CIFAR_OFFICIAL[cfg.data.name]  # pickles: only numpy reads them; not counted, so never refused
        subset = cfg.data.train_subset
        return DataSizes(train if subset is None else subset, test, classes, "3x32x32", official=True)
    if binary is not None:
        record, counts = label_bytes + CIFAR_PIXELS, []
        for files in ([f"{n}.bin" for n in py_train], [f"{n}.bin" for n in py_test]):
            sizes = [(binary / name).stat().st_size for name in files]  # OSError: missing
            if any(size % record for size in sizes):
                return DataSizes(None, None, classes, "3x32x32",
                                 why=f"a file in {str(binary)!r} is not a whole number of {record}-byte records")
            counts.append(sum(sizes) // record)
        return DataSizes(_subset(counts[0], cfg), counts[1], classes, "3x32x32")
    return DataSizes(None, None, classes, "3x32x32", why=f"no {py_dir}/ or {bin_dir}/ under {str(root)!r}")


def _imagefolder(cfg: RunConfig) -> DataSizes:
    root = Path(cfg.data.root)
    size = cfg.data.image_size or 224  # data/imagefolder.py's DEFAULT_SIZE: every image is cropped to it
    test_dir = next((root / n for n in ("val", "test", "validation") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        return DataSizes(None, None, None, f"3x{size}x{size}", why=f"no train/ and val/ folders under {str(root)!r}")
    train = _files_per_class(root / "train")
    return DataSizes(_subset(sum(train.values()), cfg), sum(_files_per_class(test_dir).values()), len(train),
                     f"3x{size}x{size}")


def _unlabeled(spec: str) -> tuple[int | None, str | None, str]:
    """(images, HxWxC, why not counted) of ``data.unlabeled``: a pseudo-label .npz, a generated shard or a folder."""
    path = Path(spec)
    shards = sorted(path.glob("*.npz")) if path.is_dir() else [path] if path.suffix == ".npz" else []
    if not shards:
        return None, None, "only .npz pools are counted without loading them"
    total, shape = 0, ()
    try:
        for shard in shards:
            with zipfile.ZipFile(shard) as z:
                member = next((m for m in ("images.npy", "image.npy") if m in z.namelist()), None)
                if member is None:
                    return None, None, f"{shard.name} has no images/image array"
                shape = npy_shape(z, member)
            total += shape[0]
    except (OSError, ValueError, SyntaxError, KeyError, IndexError, zipfile.BadZipFile, EOFError) as e:
        return None, None, f"not a readable .npz ({e})"
    return total, "x".join(str(d) for d in (*shape[1:3], shape[3] if len(shape) == 4 else 1)), ""


def count(cfg: RunConfig) -> DataSizes:
    """What ``cfg``'s data holds, as far as headers and file listings tell (ConfigError: a train_subset too large)."""
    sizes = _labeled(cfg)
    if cfg.data.unlabeled:
        n, hwc, why = _unlabeled(cfg.data.unlabeled)
        sizes = replace(sizes, unlabeled=n, unlabeled_image=hwc, unlabeled_why=why)
    return sizes


def describe(cfg: RunConfig, sizes: DataSizes) -> list[str]:
    """The dry run's lines, in the words the run logs when it loads the data."""
    data = cfg.data
    where = f" from {data.root}" if data.root else ""
    shape = [f"{sizes.classes} classes"] if sizes.classes else []
    shape += [sizes.image] if sizes.image else []
    if sizes.train is None:
        line = f"data {data.name}{where}: sizes not counted ({sizes.why}; the run counts them when it loads the data)"
    else:
        subset = " (data.train_subset)" if data.train_subset is not None else ""
        line = ", ".join([f"data {data.name}{where}: {sizes.train} training images{subset}", f"{sizes.test} test images",
                          *shape])
        if sizes.official:
            line += " (the official release's counts: the pickled batch files are read by the run)"
    lines = [line]
    if data.unlabeled:
        lines.append(f"data.unlabeled {data.unlabeled}: " + (
            f"{sizes.unlabeled} images, {sizes.unlabeled_image}" if sizes.unlabeled is not None
            else f"not counted ({sizes.unlabeled_why})"))
    return lines
