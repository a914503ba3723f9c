"""Data sets (embedded default, on-disk formats), per-rank sharding and loaders."""

from . import cifar, embedded, hf, imagefolder  # noqa: F401  (importing them registers the data sets)
from .base import DATASETS, DataSpec, build_dataset
from .sampler import ShardSampler

__all__ = ["DATASETS", "DataSpec", "ShardSampler", "build_dataset"]
