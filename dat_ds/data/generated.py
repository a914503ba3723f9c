"""Generated images at scale (DM-Improves-AT, Wang et al. 2023): ``.npz`` shards, memory-mapped, never loaded whole.

- A shard is an ``np.savez`` archive holding ``image`` (uint8, N x H x W x C or N x H x W) and ``label``
  (integer, N): the files the DM-Improves-AT authors publish (``1m.npz``, ``20m_part1.npz`` ...).
  ``data.unlabeled`` names one such file or a folder of them (every ``*.npz`` in it, in name order).
- ``np.load(mmap_mode='r')`` does not memory-map inside a zip archive: it would inflate a 61 GB member
  into memory. An ``np.savez`` member is stored uncompressed, so its bytes lie contiguously in the file:
  the zip local header and the ``.npy`` header give their offset, and we map exactly those bytes.
  Compressed shards (``np.savez_compressed``) cannot be mapped and are refused up front.
- ``GeneratedShards`` keeps at most ``max_open`` shards mapped (least recently used one closed first), and
  hands a map's pages back (``madvise(MADV_DONTNEED)``; they stay in the page cache) after every
  ``RELEASE_EVERY`` images it reads: a page fault maps a whole page-cache folio (about 1.5 MB per random
  3 KB image on Linux 6.18), so random reads into one 61 GB shard would otherwise count the pages of every
  folio they touched as this process's resident memory. So resident memory does not grow with the number
  of generated images; ``stats`` counts maps and releases for tests and the benchmark.
- ``permuted(n, key, positions)``: a seeded bijection of ``range(n)`` evaluated only at ``positions``
  (a Feistel network with cycle walking), so drawing from 50M images without replacement costs memory for
  the positions drawn, not for a 50M-entry permutation.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_KEY, LABEL_KEY = "image", "label"  # DM-Improves-AT's keys (core/data/semisup.py there)
RELEASE_EVERY = 32  # images read through a map between two hand-backs of its pages to the page cache
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class Member:
    """One array inside a shard: where its raw bytes start in the file, and what they hold."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    image: Member
    label: Member

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:  # H, W, C
        shape = self.image.shape[1:]
        return (*shape, 1) if len(shape) == 2 else shape  # type: ignore[return-value]


def is_generated(spec: str | None) -> bool:
    """``data.unlabeled`` names generated shards: a folder, or an .npz with ``image``/``label`` members."""
    if not spec:
        return False
    path = Path(spec)
    if path.is_dir():
        return True
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
    return {f"{IMAGE_KEY}.npy", f"{LABEL_KEY}.npy"} <= names


def shard_paths(spec: str) -> list[Path]:
    path = Path(spec)
    paths = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not paths:
        raise ConfigError(f"data.unlabeled folder {spec!r} holds no .npz shards; put the generated-data files "
                          "(np.savez with 'image' uint8 NHWC and 'label') in it")
    return paths


def _member(path: Path, z: zipfile.ZipFile, f, key: str) -> Member:
    try:
        info = z.getinfo(f"{key}.npy")
    except KeyError:
        raise ConfigError(f"generated-data shard {str(path)!r} has no {key!r} array (it has "
                          f"{', '.join(n.removesuffix('.npy') for n in z.namelist())}); shards need 'image' and 'label'") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ConfigError(f"generated-data shard {str(path)!r} is compressed (np.savez_compressed) and cannot be "
                          "memory-mapped; re-save it with np.savez (uncompressed): "
                          "z = np.load(f); np.savez(out, image=z['image'], label=z['label'])")
    f.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_MAGIC:
        raise ConfigError(f"generated-data shard {str(path)!r} is not a readable zip archive (bad local header "
                          f"for {key}); re-save it with np.savez")
    name_len, extra_len = fields[9], fields[10]
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    f.seek(start)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except ValueError as e:
        raise ConfigError(f"generated-data shard {str(path)!r}: {key} is not a .npy array ({e})") from None
    if fortran:
        raise ConfigError(f"generated-data shard {str(path)!r}: {key} is stored in Fortran order; re-save it with "
                          "np.savez(out, image=np.ascontiguousarray(image), label=label)")
    if dtype.hasobject:
        raise ConfigError(f"generated-data shard {str(path)!r}: {key} holds Python objects (needs pickle); store "
                          "uint8 images and integer labels")
    offset = f.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + size > os.fstat(f.fileno()).st_size:
        raise ConfigError(f"generated-data shard {str(path)!r} is truncated ({key} needs {size} bytes past "
                          f"offset {offset}); download or write it again")
    return Member(offset, tuple(shape), dtype)


def read_shard_info(path: str | Path) -> ShardInfo:
    """Headers only (the zip directory and the two .npy headers): no pixel is read."""
    path = Path(path)
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as z:
            image, label = _member(path, z, f, IMAGE_KEY), _member(path, z, f, LABEL_KEY)
    except zipfile.BadZipFile as e:
        raise ConfigError(f"generated-data shard {str(path)!r} is not an .npz archive ({e}); write it with np.savez") from None
    where = f"generated-data shard {str(path)!r}"
    if image.dtype != np.uint8:
        raise ConfigError(f"{where} holds {image.dtype} images; store uint8 pixels (0-255), NHWC or NHW")
    if len(image.shape) not in (3, 4):
        raise ConfigError(f"{where} images have shape {image.shape}; expected N x H x W (x C)")
    if image.dtype.byteorder not in "=|" or label.dtype.byteorder not in "=|<":
        raise ConfigError(f"{where} is stored big-endian; re-save it with native byte order")
    if label.dtype.kind not in "iu" or len(label.shape) != 1:
        raise ConfigError(f"{where} labels are {label.dtype} {label.shape}; expected N integer class indices")
    if label.shape[0] != image.shape[0]:
        raise ConfigError(f"{where} has {image.shape[0]} images but {label.shape[0]} labels")
    if image.shape[0] == 0:
        raise ConfigError(f"{where} is empty")
    return ShardInfo(path, image, label)


def read_shard_infos(spec: str) -> list[ShardInfo]:
    infos = [read_shard_info(p) for p in shard_paths(spec)]
    shapes = {info.image_shape for info in infos}
    if len(shapes) > 1:
        raise ConfigError(f"data.unlabeled {spec!r} mixes image shapes {sorted(shapes)}; every shard must hold "
                          "images of one size")
    return infos


class _Mapped:
    """One shard's image and label bytes, mapped read-only."""

    def __init__(self, info: ShardInfo):
        with open(info.path, "rb") as f:
            self.images = self._map(f, info.image)
            self.labels = self._map(f, info.label)

    def release(self) -> bool:
        """Drop this map's resident pages (re-read from the page cache on the next access)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return False
        for mm, _ in (self.images, self.labels):
            mm.madvise(mmap.MADV_DONTNEED)
        return True

    @staticmethod
    def _map(f, m: Member):
        start = m.offset - m.offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page aligned
        size = int(np.prod(m.shape, dtype=np.int64)) * m.dtype.itemsize
        mm = mmap.mmap(f.fileno(), m.offset - start + size, access=mmap.ACCESS_READ, offset=start)
        array = np.frombuffer(mm, dtype=m.dtype, count=size // m.dtype.itemsize, offset=m.offset - start)
        return mm, array.reshape(m.shape)

    def close(self) -> None:
        for name in ("images", "labels"):
            mm, array = getattr(self, name)
            del array
            setattr(self, name, None)
            mm.close()


@dataclass
class MapStats:
    opened: int = 0  # maps made over the reader's life
    max_open: int = 0  # the most shards mapped at once
    released: int = 0  # times a map's resident pages were handed back (RELEASE_BYTES)


class GeneratedShards:
    """Random access to the images of many shards as one array of ``len(self)`` examples."""

    def __init__(self, infos: list[ShardInfo], *, max_open: int = 2):
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        self.infos, self.max_open = infos, max_open
        self.starts = np.cumsum([0] + [len(i) for i in infos], dtype=np.int64)
        self.image_shape = infos[0].image_shape
        self._open: OrderedDict[int, _Mapped] = OrderedDict()
        self.stats = MapStats()

    @classmethod
    def from_spec(cls, spec: str, *, max_open: int = 2) -> GeneratedShards:
        return cls(read_shard_infos(spec), max_open=max_open)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):  # DataLoader workers (spawn) map their own shards
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    @property
    def open_count(self) -> int:
        return len(self._open)

    def _shard(self, s: int) -> _Mapped:
        mapped = self._open.get(s)
        if mapped is not None:
            self._open.move_to_end(s)
            return mapped
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)[1].close()
        mapped = self._open[s] = _Mapped(self.infos[s])
        self.stats.opened += 1
        self.stats.max_open = max(self.stats.max_open, len(self._open))
        return mapped

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Images (uint8, n x H x W x C) and int64 labels of ``indices``, in that order; each shard is
        mapped at most once per call (indices are grouped by shard)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"generated image index out of range [0, {len(self)})")
        images = np.empty((len(idx), *self.image_shape), dtype=np.uint8)
        labels = np.empty(len(idx), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == s)
            local = idx[rows] - self.starts[s]
            order = np.argsort(local, kind="stable")  # ascending offsets: sequential-ish reads from the file
            rows, local = rows[order], local[order]
            mapped = self._shard(int(s))
            for lo in range(0, len(rows), RELEASE_EVERY):
                part = slice(lo, lo + RELEASE_EVERY)
                images[rows[part]] = mapped.images[1][local[part]].reshape(-1, *self.image_shape)
                labels[rows[part]] = mapped.labels[1][local[part]]
                if mapped.release():
                    self.stats.released += 1
        return images, labels

    def close(self) -> None:
        while self._open:
            self._open.popitem(last=False)[1].close()


def label_range(info: ShardInfo, chunk: int = 1 << 22) -> tuple[int, int]:
    """Smallest and largest label of a shard, read in chunks through a map (labels only, never pixels)."""
    with open(info.path, "rb") as f:
        mm, labels = _Mapped._map(f, info.label)
        try:
            lo, hi = None, None
            for i in range(0, len(labels), chunk):
                part = labels[i:i + chunk]
                lo = int(part.min()) if lo is None else min(lo, int(part.min()))
                hi = int(part.max()) if hi is None else max(hi, int(part.max()))
            del part
        finally:
            del labels
            mm.close()
    return lo, hi


# --- a permutation of range(n) evaluated pointwise --------------------------------------------------------

def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64's finaliser of ``x ^ key`` (uint64 arithmetic wraps, as intended)."""
    with np.errstate(over="ignore"):
        z = (x ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _feistel(x: np.ndarray, half_bits: int, keys: list[int]) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    left, right = x >> np.uint64(half_bits), x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right, k) & mask)
    return (left << np.uint64(half_bits)) | right


def permuted(n: int, key: int, positions) -> np.ndarray:
    """``perm[positions]`` for a pseudo-random permutation ``perm`` of ``range(n)`` chosen by ``key``.

    A balanced Feistel network permutes ``range(4**h) >= n``; cycle walking (apply it again while the value
    is ``>= n``) restricts it to ``range(n)``, and stays a bijection.
    """
    pos = np.asarray(positions, dtype=np.uint64).reshape(-1)
    if n <= 1:
        return np.zeros(len(pos), dtype=np.int64)
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    keys = [int(v) for v in _mix(np.arange(4, dtype=np.uint64), key)]
    out = _feistel(pos, half_bits, keys)
    walking = out >= np.uint64(n)
    while walking.any():
        out[walking] = _feistel(out[walking], half_bits, keys)
        walking = out >= np.uint64(n)
    return out.astype(np.int64)
