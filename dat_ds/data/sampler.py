"""Per-rank sharding: every rank attacks its own slice of the data.

``ShardSampler`` is a resumable DistributedSampler: the order depends only on (seed, epoch), each rank
takes ``order[rank::world]``, and ``start`` skips the examples a resumed run has already seen this
epoch. Training drops the ragged tail so every rank takes the same number of steps; evaluation
(``drop_last=False``) covers every example exactly once with no padding, so gathered results equal a
single-rank run.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    def __init__(self, num_examples: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, multiple_of: int = 1):
        self.num_examples = num_examples
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
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

    def indices(self) -> list[int]:
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
