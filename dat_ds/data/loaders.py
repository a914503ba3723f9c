"""Training and evaluation loaders: one place that decides how a rank gets its batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ..core import dist
from .sampler import ShardSampler


class IndexedDataset(Dataset):
    """``dataset[i]`` as ``(x, y, i)``: batches carry their examples' positions (perturbation reuse keys on them)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


class TrainLoaderFactory:
    """Builds the per-epoch training loader for this rank, resumable mid-epoch.

    ``loader(epoch, start_step)`` yields ``(x, y)`` micro-batches, ``(x, y, index)`` under ``attack.reuse``
    (each rank then keeps its own fixed shard: ``shard()``); ``steps_per_epoch`` is the same on every rank
    (ragged tails are dropped) so collectives stay in lockstep.
    """

    def __init__(self, cfg, dataset, *, micro_batch: int, rank: int, world_size: int):
        reuse = cfg.attack.reuse
        self.cfg, self.micro_batch = cfg, micro_batch
        self.dataset = IndexedDataset(dataset) if reuse else dataset
        self.sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size, shuffle=True, seed=cfg.seed,
                                    drop_last=True, multiple_of=micro_batch, fixed_shards=reuse)

    def shard(self) -> list[int]:
        """The training examples this rank owns every epoch (``attack.reuse``)."""
        return self.sampler.shard()

    @property
    def steps_per_epoch(self) -> int:
        self.sampler.set_epoch(0, 0)
        return len(self.sampler) // self.micro_batch

    def loader(self, epoch: int, start_step: int = 0) -> DataLoader:
        self.sampler.set_epoch(epoch, start=start_step * self.micro_batch)
        workers = self.cfg.data.num_workers
        return DataLoader(self.dataset, batch_size=self.micro_batch, sampler=self.sampler, num_workers=workers,
                          pin_memory=dist.accelerator().device_name() != "cpu", drop_last=True,
                          persistent_workers=False, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))


def build_train_loader(cfg, dataset, *, micro_batch: int, rank: int, world_size: int) -> TrainLoaderFactory:
    """Hook point: unlabeled-data mixing (RST) swaps in its own factory here."""
    if cfg.data.unlabeled:
        from .unlabeled import MixedTrainLoaderFactory

        return MixedTrainLoaderFactory(cfg, dataset, micro_batch=micro_batch, rank=rank, world_size=world_size)
    return TrainLoaderFactory(cfg, dataset, micro_batch=micro_batch, rank=rank, world_size=world_size)
