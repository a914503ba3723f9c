"""The shard sampler: disjoint shards that cover the data set, exact mid-epoch resume, a new order each epoch."""

from __future__ import annotations

import pytest

from dat_ds.data import ShardSampler


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_cover(world):
    n = 103
    shards = [ShardSampler(n, rank=r, world_size=world, seed=1, drop_last=False) for r in range(world)]
    for s in shards:
        s.set_epoch(4)
    got = sorted(i for s in shards for i in s)
    assert got == list(range(n))
    train = [ShardSampler(n, rank=r, world_size=world, seed=1, drop_last=True, multiple_of=8) for r in range(world)]
    lengths = {len(s) for s in train}
    assert len(lengths) == 1 and lengths.pop() % 8 == 0  # every rank takes the same number of whole batches


def test_sampler_resume_offset_and_epoch_order():
    s = ShardSampler(50, rank=1, world_size=2, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=10)
    assert list(s) == full[10:]
    s.set_epoch(3)
    assert list(s) != full  # a new order each epoch
