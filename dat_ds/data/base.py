"""Data set registry and the facts a model and an attack need about a data set."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from ..core.registry import Registry


@dataclass(frozen=True)
class DataSpec:
    in_chans: int
    num_classes: int
    img_size: int
    mean: tuple[float, ...]  # normalisation lives in the model wrapper, so attacks work in pixel units
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()


# name -> fn(data_cfg, split: "train" | "test", train: bool) -> (Dataset, DataSpec)
DATASETS: Registry = Registry("data set")


def build_dataset(data_cfg, split: str) -> tuple[Dataset, DataSpec]:
    return DATASETS.get(data_cfg.name)(data_cfg, split)
