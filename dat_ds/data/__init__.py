"""Data sets (embedded default, on-disk formats), per-rank sharding and loaders."""

from . import embedded  # noqa: F401  (registers the embedded default)
from . import cifar, hf, imagefolder  # noqa: F401  (register the on-disk formats)
from .base import DATASETS, DataSpec, build_dataset
from .sampler import ShardSampler

__all__ = ["DATASETS", "DataSpec", "ShardSampler", "build_dataset"]
