"""Per-rank sharding: every rank attacks its own slice of the data.

``ShardSampler`` is a resumable DistributedSampler: the order depends only on (seed, epoch), each rank
takes ``order[rank::world]``, and ``start`` skips the examples a resumed run has already seen this
epoch. Training drops the ragged tail so every rank takes the same number of steps; evaluation
(``drop_last=False``) covers every example exactly once with no padding, so gathered results equal a
single-rank run.

``fixed_shards=True`` (perturbation reuse, ``attack.reuse``): each rank owns the same examples every
epoch, ``perm(seed)[rank::world]`` of one seed-only permutation, shuffled within the shard per (seed,
epoch, rank). Shards differ in size by at most one; every rank takes the same count per epoch (the
smallest shard, rounded down to whole batches), so a shard's spare examples rotate between epochs.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    def __init__(self, num_examples: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, multiple_of: int = 1, fixed_shards: bool = False):
        self.num_examples = num_examples
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.fixed_shards = fixed_shards
        self.multiple_of = multiple_of  # per-rank count rounded down to whole batches when dropping
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; ``start`` = number of this rank's examples already consumed."""
        self.epoch, self.start = epoch, start

    def _per_rank(self) -> int:
        if self.drop_last:
            n = self.num_examples // self.world_size
            return n - n % self.multiple_of
        return len(range(self.rank, self.num_examples, self.world_size))

    def shard(self) -> list[int]:
        """The examples this rank owns under ``fixed_shards`` (the same every epoch)."""
        if self.shuffle:  # a seed no epoch's order uses
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 2**40)
            order = torch.randperm(self.num_examples, generator=g).tolist()
        else:
            order = list(range(self.num_examples))
        return order[self.rank::self.world_size]

    def indices(self) -> list[int]:
        if self.fixed_shards:
            shard = self.shard()
            if self.shuffle:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 4099 + self.rank)
                shard = [shard[i] for i in torch.randperm(len(shard), generator=g).tolist()]
            return shard[: self._per_rank()]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_examples, generator=g).tolist()
        else:
            order = list(range(self.num_examples))
        return order[self.rank::self.world_size][: self._per_rank()]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, self._per_rank() - self.start)
