"""The validation split of ``train.keep_best`` (Rice et al. 2020): held-out training examples, never the test set.

``validation_indices`` draws ``n`` positions of the training set with a generator seeded by the run's seed only,
so every rank (and a resumed run) carves the same split; the training set is the rest, in its original order.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from ..core.errors import ConfigError

SPLIT_SEED = 20_200_710  # mixed with cfg.seed: the split does not move with the other streams of the run


def validation_indices(size: int, n: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` positions of a training set of ``size``: ``n`` seeded ones held out, both sorted."""
    if n >= size:
        raise ConfigError(f"train.val_examples={n} leaves nothing to train on: the training set has {size} "
                          "examples; lower train.val_examples")
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + SPLIT_SEED))
    val = sorted(perm[:n].tolist())
    held = set(val)
    return [i for i in range(size) if i not in held], val


def split_validation(train_set: Dataset, n: int, seed: int,
                     plain: Dataset | None = None) -> tuple[Subset, Subset]:
    """``(train, val)`` subsets; ``plain`` (the same examples without augmentation) serves the validation side."""
    train_idx, val_idx = validation_indices(len(train_set), n, seed)
    return Subset(train_set, train_idx), Subset(plain if plain is not None else train_set, val_idx)
