"""Training and evaluation loaders: one place that decides how a rank gets its batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..core import dist
from .sampler import ShardSampler


class TrainLoaderFactory:
    """Builds the per-epoch training loader for this rank, resumable mid-epoch.

    ``loader(epoch, start_step)`` yields ``(x, y)`` micro-batches; ``steps_per_epoch`` is the same on
    every rank (ragged tails are dropped) so collectives stay in lockstep.
    """

    def __init__(self, cfg, dataset, *, micro_batch: int, rank: int, world_size: int):
        self.cfg, self.dataset, self.micro_batch = cfg, dataset, micro_batch
        self.sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size, shuffle=True, seed=cfg.seed,
                                    drop_last=True, multiple_of=micro_batch)

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
