"""Unlabeled data, RST-style (Carmon et al. 2019): pools, pseudo-label files, and mixed batches.

- A *pool* is a set of images without labels: ``embedded:train[1000:]`` (the part of the embedded
  training split not used as labeled data when ``data.train_subset=1000``), ``fashion-mnist-full:train[10000:]``
  (the Debian IDX files), or an ``.npz`` file with an ``images`` array (uint8, NHWC or NHW).
- ``dat-ds pseudo-label`` runs a teacher over a pool and writes a *pseudo-label file*: an ``.npz``
  (read with ``allow_pickle=False``, so loading it never runs code) holding ``images``, ``labels``,
  ``confidences`` and a JSON ``meta`` string, written atomically.
- With ``data.unlabeled: FILE.npz`` training draws every micro-batch of ``B`` examples as
  ``B - round(f * B)`` labeled + ``round(f * B)`` pseudo-labelled ones (``f = data.unsup_fraction``) on
  every rank. An epoch has as many steps as the concatenated data set holds global batches; the smaller
  group is cycled through fresh permutations. The order depends only on (seed, epoch, rank), so a run
  resumes mid-epoch exactly, and every rank takes the same number of steps.
- With ``data.unlabeled: FOLDER`` (or one ``.npz`` holding ``image``/``label``, DM-Improves-AT's format) the
  generated images are memory-mapped shard by shard (``generated.py``), never loaded whole. Batches mix
  them in the same way, but as DM-Improves-AT does: an epoch is one pass over the *labeled* set (its
  400 epochs mean 400 x 50,000 labeled images), and the generated images are drawn without replacement
  from one pseudo-random permutation per pass over them that continues across epochs (each rank its own
  disjoint part), evaluated pointwise so 50M images cost no 50M-entry index. The position is a pure
  function of (seed, epoch, step, rank), like the rest of the data order, so resuming from a checkpoint's
  (epoch, step) continues the stream exactly.
- Legacy pickle files (RST's ``ti_500K_pseudo_labeled.pickle``: ``data`` + ``extrapolated_targets``)
  can run arbitrary code when loaded: refused unless ``data.trust_pickle: true``.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from ..core import dist
from ..core.errors import ConfigError
from ..core.io import atomic_write_bytes
from ..core.pools import POOL_SPEC as _POOL_SPEC
from .embedded import DEBIAN_DIR, ArrayDataset, load_embedded_arrays, read_idx
from .generated import GeneratedShards, is_generated, permuted

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pkl", ".pickle")
MAX_OPEN_SHARDS = 2  # generated-data shards mapped at once per reader (each DataLoader worker has its own)


@dataclass
class PseudoLabeled:
    images: np.ndarray  # uint8, NHWC
    labels: np.ndarray  # int64 pseudo-labels
    confidences: np.ndarray  # float32 teacher probability of the pseudo-label (1.0 when unknown)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def _nhwc(images: np.ndarray, what: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ConfigError(f"{what} holds {images.dtype} images; store uint8 pixels (0-255), NHWC or NHW")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ConfigError(f"{what} images have shape {images.shape}; expected N x H x W (x C)")
    return images


def read_npz(path: Path, what: str, fix: str) -> dict[str, np.ndarray]:
    """Every array of a user's ``.npz`` (a pool or a pseudo-label file), read without pickle. A file that is not
    a whole archive (empty, truncated, another format), a damaged member or an object array is one
    ``ConfigError`` line: ``what`` names the file, ``fix`` says what to do."""
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it, or fail deep inside zipfile
        raise ConfigError(f"{what} is not an .npz archive (empty, truncated or another format); {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except ValueError as e:  # object arrays need pickle: refuse them
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        problem = f"cannot be read without pickle ({first})"
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # a member cut short or its bytes damaged
        problem = f"is damaged ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'})"
    raise ConfigError(f"{what} {problem}; {fix}")


def class_indices(labels: np.ndarray, what: str) -> np.ndarray:
    """N labels as int64 class indices: a 1-D integer array, or floats that are all whole numbers (never cast
    blindly: NaN would become a huge negative index). The class count is the data set's to check."""
    if labels.ndim != 1 or labels.dtype.kind not in "iuf":
        raise ConfigError(f"{what} labels are {labels.dtype} {labels.shape}; expected N integer class indices")
    if labels.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(labels))
        if len(bad):
            raise ConfigError(f"{what} label {bad[0]} is {labels[bad[0]]}; labels must be integer class indices")
        if (labels != np.round(labels)).any():
            raise ConfigError(f"{what} has fractional labels; labels must be integer class indices")
    return labels.astype(np.int64)


def _load_pickle(path: Path, trust_pickle: bool) -> dict[str, Any]:
    if not trust_pickle:
        raise ConfigError(
            f"{str(path)!r} is a pickle file, which can run code when loaded; convert it to .npz "
            "(`dat-ds pseudo-label --pool FILE.npz ...`) or set data.trust_pickle=true if you trust its source"
        )
    log.warning("loading pickle file %s because data.trust_pickle is set", path)
    with open(path, "rb") as f:
        obj = pickle.load(f)  # noqa: S301 - the user vouched for this file
    if not isinstance(obj, dict):
        raise ConfigError(f"pickle file {str(path)!r} holds a {type(obj).__name__}; expected a dict with 'data'")
    return obj


def load_pool(spec: str, *, trust_pickle: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (uint8 NHWC) of an unlabeled pool, plus its true labels when the source has them."""
    m = _POOL_SPEC.match(spec)
    if m:
        lo = int(m["lo"]) if m["lo"] else None
        hi = int(m["hi"]) if m["hi"] else None
        split = m["split"]
        if m["source"] == "embedded":
            arrays = load_embedded_arrays()
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        elif m["source"] == "fashion-mnist-full":
            prefix = "train" if split == "train" else "t10k"
            path = DEBIAN_DIR / f"{prefix}-images-idx3-ubyte.gz"
            if not path.exists():
                raise ConfigError(f"pool {spec!r} needs the Debian Fashion-MNIST files in {str(DEBIAN_DIR)!r}; "
                                  "install them with `apt-get install dataset-fashion-mnist` or use an embedded: pool")
            images, labels = read_idx(path), read_idx(DEBIAN_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        else:
            raise ConfigError(f"unknown pool source {m['source']!r} in {spec!r}; use embedded:, fashion-mnist-full: or a .npz file")
        images, labels = images[lo:hi], labels[lo:hi]
        if len(images) == 0:
            raise ConfigError(f"pool {spec!r} is empty; check the slice (e.g. embedded:train[1000:])")
        return _nhwc(np.ascontiguousarray(images), f"pool {spec!r}"), np.asarray(labels, dtype=np.int64)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"pool {spec!r} is neither an existing file nor a spec like embedded:train[1000:]")
    if path.suffix in PICKLE_SUFFIXES:
        obj = _load_pickle(path, trust_pickle)
        return _nhwc(np.asarray(obj.get("data", obj.get("images"))), f"pool {spec!r}"), None
    if path.suffix != ".npz":
        raise ConfigError(f"pool file {spec!r} must be .npz with an 'images' array (uint8 NHWC)")
    what = f"pool file {spec!r}"
    arrays = read_npz(path, what, "write it again with np.savez(path, images=uint8 NHWC array)")
    if "images" not in arrays:
        raise ConfigError(f"{what} has no 'images' array (it has {', '.join(arrays) or 'none'})")
    images = _nhwc(arrays["images"], what)
    labels = class_indices(arrays["true_labels"], what) if "true_labels" in arrays else None
    if labels is not None and len(labels) != len(images):
        raise ConfigError(f"{what} has {len(images)} images but {len(labels)} true_labels; store one per image")
    if len(images) == 0:
        raise ConfigError(f"{what} is empty; give a pool with images in it")
    return images, labels


def save_pseudo_labels(path: str | Path, data: PseudoLabeled) -> Path:
    """Write ``data`` as a pickle-free .npz, atomically (a reader never sees half a file)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"pseudo-label output {str(path)!r} must end in .npz")
    if not (len(data.images) == len(data.labels) == len(data.confidences)):
        raise ValueError("images, labels and confidences must have the same length")
    buf = io.BytesIO()
    np.savez_compressed(buf, images=_nhwc(np.asarray(data.images), "pseudo-label data"),
                        labels=np.asarray(data.labels, dtype=np.int64),
                        confidences=np.asarray(data.confidences, dtype=np.float32),
                        meta=np.array(json.dumps(data.meta)))
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_pseudo_labels(path: str | Path, *, trust_pickle: bool = False, what: str | None = None) -> PseudoLabeled:
    """A pseudo-label file, checked whole (the one check of this format, for every command that reads one):
    uint8 N x H x W (x C) images, N integer labels, N confidences in [0, 1], a JSON ``meta``. ``what`` names
    the file in errors (default: ``pseudo-label file 'PATH'``); each problem is one ``ConfigError`` line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.unlabeled {str(path)!r} not found; give a pseudo-label file (`dat-ds pseudo-label`) "
                          "or a folder of generated .npz shards ('image' uint8 NHWC, 'label')")
    what = what or f"pseudo-label file {str(path)!r}"
    fix = "rewrite it with `dat-ds pseudo-label`"
    if path.suffix in PICKLE_SUFFIXES:
        obj = _load_pickle(path, trust_pickle)
        images = obj.get("data", obj.get("images"))
        labels = obj.get("extrapolated_targets", obj.get("labels"))
        if images is None or labels is None:
            raise ConfigError(f"pickle file {str(path)!r} lacks 'data'/'extrapolated_targets' (RST format)")
        arrays = {"images": np.asarray(images), "labels": np.asarray(labels)}
        meta = {"source": str(path), "format": "rst-pickle"}
    elif path.suffix != ".npz":
        raise ConfigError(f"data.unlabeled={str(path)!r} must be an .npz written by `dat-ds pseudo-label`")
    else:
        arrays = read_npz(path, what, fix)
        missing = {"images", "labels"} - set(arrays)
        if missing:
            raise ConfigError(f"{what} lacks {', '.join(sorted(missing))}; {fix}")
        try:
            meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} has a 'meta' that is not JSON ({e.msg}); {fix}") from None
    images = _nhwc(arrays["images"], what)
    labels = class_indices(arrays["labels"], what)
    if len(images) != len(labels):
        raise ConfigError(f"{what} has {len(images)} images but {len(labels)} labels; {fix}")
    if len(labels) == 0:
        raise ConfigError(f"{what} is empty; {fix}")
    conf = arrays.get("confidences")
    if conf is None:
        conf = np.ones(len(labels), np.float32)
    elif conf.ndim != 1 or len(conf) != len(labels) or conf.dtype.kind not in "iuf":
        raise ConfigError(f"{what} has confidences {conf.dtype} {conf.shape} for {len(labels)} labels; {fix}")
    elif not ((conf >= 0) & (conf <= 1)).all():  # NaN fails both
        raise ConfigError(f"{what} has confidences outside [0, 1] (or not finite); {fix}")
    return PseudoLabeled(images, labels, conf.astype(np.float32), meta)


class MixedBatchSampler(Sampler[list[int]]):
    """Per-rank batches of ``labeled_per_batch`` indices into ``[0, n_labeled)`` followed by
    ``unlabeled_per_batch`` indices into ``[n_labeled, n_labeled + n_unlabeled)`` (a ConcatDataset)."""

    def __init__(self, n_labeled: int, n_unlabeled: int, *, labeled_per_batch: int, unlabeled_per_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n_labeled, self.n_unlabeled = n_labeled, n_unlabeled
        self.k_lab, self.k_unl = labeled_per_batch, unlabeled_per_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start = 0, 0
        batch = self.k_lab + self.k_unl
        # As many steps as the concatenated data set holds global batches (RST's epoch length).
        self.steps = (n_labeled + n_unlabeled) // (world_size * batch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def _stream(self, n: int, group: int, count: int) -> list[int]:
        """This rank's first ``count`` indices of a stream of per-cycle permutations of ``range(n)``."""
        out: list[int] = []
        per_rank = n // self.world_size
        cycle = 0
        while len(out) < count:
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 7 + group) * 10_007 + cycle)
            out += torch.randperm(n, generator=g).tolist()[self.rank::self.world_size][:per_rank]
            cycle += 1
        return out[:count]

    def batches(self) -> list[list[int]]:
        lab = self._stream(self.n_labeled, 0, self.steps * self.k_lab) if self.k_lab else []
        unl = self._stream(self.n_unlabeled, 1, self.steps * self.k_unl) if self.k_unl else []
        return [lab[s * self.k_lab:(s + 1) * self.k_lab] + [self.n_labeled + i for i in unl[s * self.k_unl:(s + 1) * self.k_unl]]
                for s in range(self.steps)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.start:])

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


class GeneratedDataset(Dataset):
    """Generated shards as ``(float CHW in [0, 1], label)`` items; a batch is read in one grouped call."""

    def __init__(self, shards: GeneratedShards):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.shards.read(indices)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
        return list(zip(x, torch.from_numpy(labels)))


class MixedDataset(Dataset):
    """``labeled`` then ``generated`` as one index space (a ConcatDataset that fetches a batch's generated
    part in one ``__getitems__`` call, so each shard is mapped once per batch, not once per image)."""

    def __init__(self, labeled, generated: GeneratedDataset):
        self.labeled, self.generated, self.n_labeled = labeled, generated, len(labeled)

    def __len__(self) -> int:
        return self.n_labeled + len(self.generated)

    def __getitem__(self, i: int):
        return self.labeled[i] if i < self.n_labeled else self.generated[i - self.n_labeled]

    def __getitems__(self, indices: list[int]):
        out: list = [None] * len(indices)
        gen = [(k, i - self.n_labeled) for k, i in enumerate(indices) if i >= self.n_labeled]
        for k, i in enumerate(indices):
            if i < self.n_labeled:
                out[k] = self.labeled[i]
        if gen:
            for (k, _), item in zip(gen, self.generated.__getitems__([j for _, j in gen])):
                out[k] = item
        return out


class GeneratedBatchSampler(MixedBatchSampler):
    """``MixedBatchSampler`` for generated shards, as DM-Improves-AT samples them: an epoch is one pass over
    the labeled set, and the generated part is one stream over the whole pool without replacement that
    continues across epochs (a fresh permutation each time the pool is used up), each rank taking every
    ``world_size``-th position of it: disjoint across ranks."""

    def __init__(self, n_labeled: int, n_unlabeled: int, **kwargs):
        super().__init__(n_labeled, n_unlabeled, **kwargs)
        batch = self.k_lab + self.k_unl
        self.steps = max(1, -(-n_labeled // (self.world_size * batch)))  # ceil, as DM's num_batches

    def unlabeled_positions(self, step: int) -> np.ndarray:
        """Indices into the generated pool of this rank's ``step``-th batch of ``self.epoch``."""
        per_rank = self.n_unlabeled // self.world_size
        first = (self.epoch * self.steps + step) * self.k_unl
        g = np.arange(first, first + self.k_unl, dtype=np.int64)
        cycle, offset = g // per_rank, g % per_rank
        out = np.empty(len(g), dtype=np.int64)
        for c in np.unique(cycle):
            rows = cycle == c
            key = (self.seed * 1_000_003 + int(c)) * 10_007 + 1
            out[rows] = permuted(self.n_unlabeled, key, offset[rows] * self.world_size + self.rank)
        return out

    def batches(self) -> list[list[int]]:
        lab = self._stream(self.n_labeled, 0, self.steps * self.k_lab)
        return [lab[s * self.k_lab:(s + 1) * self.k_lab]
                + (self.n_labeled + self.unlabeled_positions(s)).tolist() for s in range(self.steps)]


class MixedTrainLoaderFactory:
    """Drop-in for ``TrainLoaderFactory`` when ``data.unlabeled`` is set: labeled + pseudo-labelled batches."""

    def __init__(self, cfg, labeled, *, micro_batch: int, rank: int, world_size: int):
        self.cfg, self.micro_batch = cfg, micro_batch
        generated = is_generated(cfg.data.unlabeled)
        if generated:
            shards = GeneratedShards.from_spec(cfg.data.unlabeled, max_open=MAX_OPEN_SHARDS)
            unlabeled = GeneratedDataset(shards)
            h, w, c = shards.image_shape
            shape_u = (c, h, w)  # from the headers: nothing is mapped in this (parent) process
        else:
            pseudo = load_pseudo_labels(cfg.data.unlabeled, trust_pickle=cfg.data.trust_pickle)
            unlabeled = ArrayDataset(pseudo.images, pseudo.labels)
            shape_u = tuple(unlabeled[0][0].shape)
        shape_l = tuple(labeled[0][0].shape)
        if shape_l != shape_u:
            raise ConfigError(f"data.unlabeled images are {shape_u} but the labeled data gives {shape_l}; "
                              "pseudo-label a pool of the same data set")
        k_unl = round(cfg.data.unsup_fraction * micro_batch)
        if k_unl >= micro_batch:
            raise ConfigError(f"data.unsup_fraction={cfg.data.unsup_fraction} leaves no labeled example in a micro-batch "
                              f"of {micro_batch}; lower it or raise train_micro_batch_size_per_gpu")
        for name, n, k in (("labeled", len(labeled), micro_batch - k_unl), ("unlabeled", len(unlabeled), k_unl)):
            if k and n < world_size:
                raise ConfigError(f"the {name} set has {n} examples, fewer than the {world_size} ranks; add data")
        self.dataset = MixedDataset(labeled, unlabeled) if generated else ConcatDataset([labeled, unlabeled])
        self.labeled_per_batch, self.unlabeled_per_batch = micro_batch - k_unl, k_unl
        sampler_cls = GeneratedBatchSampler if generated else MixedBatchSampler
        self.sampler = sampler_cls(len(labeled), len(unlabeled), labeled_per_batch=micro_batch - k_unl,
                                   unlabeled_per_batch=k_unl, rank=rank, world_size=world_size, seed=cfg.seed)
        log.info("mixing %d labeled + %d %s examples (%s): %d + %d per micro-batch, %d steps per epoch%s",
                 len(labeled), len(unlabeled), "generated" if generated else "pseudo-labelled", cfg.data.unlabeled,
                 micro_batch - k_unl, k_unl, self.sampler.steps,
                 f" (one pass over the labeled set; {len(shards.infos)} memory-mapped shard(s))" if generated else "")

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps

    def loader(self, epoch: int, start_step: int = 0) -> DataLoader:
        self.sampler.set_epoch(epoch, start_step)
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=self.cfg.data.num_workers,
                          pin_memory=dist.accelerator().device_name() != "cpu", persistent_workers=False)
