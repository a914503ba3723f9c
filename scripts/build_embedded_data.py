"""Rebuild the embedded Fashion-MNIST subset shipped in ``dat_ds/data/embedded/``.

Source: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which
installs the original IDX files of Fashion-MNIST (Zalando Research, MIT licence).

The subset is class-balanced and deterministic: for each split we take the first ``n // 10`` examples
of every class in file order. Run:

    uv run python scripts/build_embedded_data.py [--src DIR] [--train 10000] [--test 2000]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
from pathlib import Path

import numpy as np

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"  # where the Debian package puts the IDX files
OUT_DIR = Path(__file__).resolve().parents[1] / "dat_ds" / "data" / "embedded"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_indices(labels: np.ndarray, n: int, num_classes: int = 10) -> np.ndarray:
    per_class = n // num_classes
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(picked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=DEFAULT_SRC, help="folder with the Fashion-MNIST IDX .gz files")
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--test", type=int, default=2_000)
    args = parser.parse_args()
    src = Path(args.src)
    if not (src / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"error: no Fashion-MNIST IDX files in {src}; fix: apt-get install dataset-fashion-mnist")

    arrays = {}
    for split, prefix, n in (("train", "train", args.train), ("test", "t10k", args.test)):
        images = read_idx(src / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")
        idx = balanced_indices(labels, n)
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx].astype(np.int64)
        arrays[f"{split}_source_index"] = idx.astype(np.int64)

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tmp = OUT_DIR / "fashion_mnist_subset.npz.tmp"
    tmp.write_bytes(data)
    tmp.replace(OUT_DIR / "fashion_mnist_subset.npz")
    digest = hashlib.sha256(data).hexdigest()
    (OUT_DIR / "fashion_mnist_subset.sha256").write_text(digest + "\n")
    for k, v in arrays.items():
        print(f"{k}: {v.shape} {v.dtype}")
    print(f"wrote {len(data) / 1e6:.1f} MB, sha256 {digest}")


if __name__ == "__main__":
    main()
