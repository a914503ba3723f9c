"""Generated data at scale: memory-mapped .npz shards (DM-Improves-AT's format), mixing, resuming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dat_ds.core.config import build_config
from dat_ds.core.errors import ConfigError
from dat_ds.data import build_dataset
from dat_ds.data.generated import GeneratedShards, is_generated, label_range, permuted, read_shard_info
from dat_ds.data.loaders import build_train_loader
from dat_ds.data.unlabeled import GeneratedBatchSampler, MixedTrainLoaderFactory


def _write_shards(folder, sizes, shape=(28, 28, 1), *, first_label=0, compressed=False):
    """Shards whose image i (global numbering) has every pixel = i % 251 and row 0 col 0..3 = i in base 256,
    so a read can be checked for exactly which image came back; label = (i + first_label) % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for s, n in enumerate(sizes):
        idx = np.arange(start, start + n)
        images = np.broadcast_to((idx % 251).astype(np.uint8)[:, None, None, None], (n, *shape)).copy()
        for b in range(3):
            images[:, 0, b, 0] = (idx >> (8 * b)) & 255
        save = np.savez_compressed if compressed else np.savez
        save(folder / f"part{s:03d}.npz", image=images if shape[-1] != 1 or s % 2 == 0 else images[..., 0],
             label=(idx + first_label) % 10)
        start += n
    return folder


def _decode(images: np.ndarray) -> np.ndarray:
    px = images[:, 0, :3, 0].astype(np.int64)
    return px[:, 0] | (px[:, 1] << 8) | (px[:, 2] << 16)


def test_reader_returns_exactly_the_requested_images_across_shard_boundaries(tmp_path):
    folder = _write_shards(tmp_path / "gen", [100, 37, 1, 250])  # odd shards store N x H x W (no channel axis)
    shards = GeneratedShards.from_spec(str(folder), max_open=2)
    assert len(shards) == 388 and shards.image_shape == (28, 28, 1)
    want = np.array([0, 99, 100, 136, 137, 138, 387, 5, 137, 99, 100, 386, 0])
    images, labels = shards.read(want)
    assert images.shape == (len(want), 28, 28, 1) and images.dtype == np.uint8
    assert _decode(images).tolist() == want.tolist()
    assert labels.tolist() == (want % 10).tolist()
    assert (images[:, 5:, 5:, 0] == (want % 251)[:, None, None]).all()  # the whole image, not only the tag
    # Every image once, in a shuffled order: still exact.
    order = np.random.default_rng(0).permutation(388)
    images, labels = shards.read(order)
    assert _decode(images).tolist() == order.tolist() and labels.tolist() == (order % 10).tolist()
    with pytest.raises(IndexError):
        shards.read([388])


def test_reader_never_maps_more_than_max_open_shards(tmp_path):
    folder = _write_shards(tmp_path / "gen", [50] * 12)
    shards = GeneratedShards.from_spec(str(folder), max_open=2)
    rng = np.random.default_rng(1)
    for _ in range(40):
        batch = rng.integers(0, len(shards), size=64)
        images, _ = shards.read(batch)
        assert _decode(images).tolist() == batch.tolist()
        assert shards.open_count <= 2
    assert shards.stats.max_open == 2
    # A batch touching all 12 shards maps each of them once (grouped reads), not once per image.
    before = shards.stats.opened
    shards.read(np.arange(0, 600, 7))
    assert shards.stats.opened - before <= 12
    shards.close()
    assert shards.open_count == 0


def test_header_is_read_without_touching_pixels(tmp_path):
    folder = _write_shards(tmp_path / "gen", [30], shape=(32, 32, 3), first_label=3)
    info = read_shard_info(folder / "part000.npz")
    assert info.image.shape == (30, 32, 32, 3) and len(info) == 30 and info.image_shape == (32, 32, 3)
    with open(folder / "part000.npz", "rb") as f:  # the offset found points at image 0's first bytes
        f.seek(info.image.offset)
        assert f.read(3) == bytes([0, 0, 0])
        f.seek(info.image.offset + 5 * 32 * 32 * 3 + 32 * 3 * 31)
        assert f.read(1) == bytes([5])
    assert label_range(info) == (0, 9)
    assert is_generated(str(folder)) and is_generated(str(folder / "part000.npz"))


def test_compressed_shards_are_refused_in_one_line(tmp_path):
    folder = _write_shards(tmp_path / "gen", [20], compressed=True)
    with pytest.raises(ConfigError) as e:
        GeneratedShards.from_spec(str(folder))
    msg = str(e.value)
    assert "\n" not in msg and "compressed" in msg and "np.savez" in msg
    cfg = build_config(overrides=[f"data.unlabeled={folder}", "data.train_subset=100"])
    from dat_ds.launch.preflight import check_unlabeled

    _, spec = build_dataset(cfg.data, "train")
    with pytest.raises(ConfigError, match="compressed"):
        check_unlabeled(cfg, spec)


@pytest.mark.parametrize("problem, match", [
    ("labels", "label 10 outside"), ("shape", "32x32x3 images"), ("empty", "holds no .npz")])
def test_preflight_checks_the_shards_before_any_rank_starts(tmp_path, problem, match):
    from dat_ds.launch.preflight import check_unlabeled

    folder = tmp_path / "gen"
    if problem == "labels":
        _write_shards(folder, [20, 20], first_label=0)
        np.savez(folder / "part999.npz", image=np.zeros((4, 28, 28), np.uint8), label=np.array([1, 2, 10, 3]))
    elif problem == "shape":
        _write_shards(folder, [20], shape=(32, 32, 3))
    else:
        folder.mkdir()
    cfg = build_config(overrides=[f"data.unlabeled={folder}", "data.train_subset=100"])
    _, spec = build_dataset(cfg.data, "train")
    with pytest.raises(ConfigError, match=match):
        check_unlabeled(cfg, spec)


def test_permutation_is_a_bijection_for_any_size():
    for n in (1, 2, 3, 10, 97, 1000, 4097):
        perm = permuted(n, key=12345, positions=np.arange(n))
        assert sorted(perm.tolist()) == list(range(n))
    a, b = permuted(1000, 1, np.arange(1000)), permuted(1000, 2, np.arange(1000))
    assert (a != b).mean() > 0.9  # another key: another order
    assert abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.1  # not close to the identity


def test_sampler_ranks_draw_disjoint_generated_examples_and_the_stream_continues_across_epochs():
    n_lab, n_unl, k_lab, k_unl, world = 100, 1000, 3, 7, 2
    samplers = [GeneratedBatchSampler(n_lab, n_unl, labeled_per_batch=k_lab, unlabeled_per_batch=k_unl, rank=r,
                                      world_size=world, seed=5) for r in range(world)]
    assert samplers[0].steps == -(-100 // (2 * 10))  # one pass over the labeled set: 5 steps
    seen = []
    for epoch in range(14):  # 14 epochs x 5 steps x 7 = 490 < 500 per rank: no generated image twice
        for s in samplers:
            s.set_epoch(epoch)
            for batch in s:
                assert len(batch) == 10 and all(i < n_lab for i in batch[:k_lab])
                seen += [i - n_lab for i in batch[k_lab:]]
    assert len(seen) == len(set(seen)) == 2 * 14 * 5 * 7
    assert min(seen) >= 0 and max(seen) < n_unl
    # Resuming mid-epoch gives the same batches as running through.
    s = samplers[1]
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start_step=2)
    assert list(s) == full[2:]


def test_training_loader_mixes_generated_shards_at_the_fraction(tmp_path):
    folder = _write_shards(tmp_path / "gen", [300, 200, 500])
    cfg = build_config(overrides=["data.train_subset=128", f"data.unlabeled={folder}", "data.unsup_fraction=0.7"])
    labeled, _ = build_dataset(cfg.data, "train")
    factory = build_train_loader(cfg, labeled, micro_batch=20, rank=1, world_size=2)
    assert isinstance(factory, MixedTrainLoaderFactory)
    assert factory.unlabeled_per_batch == 14 and factory.labeled_per_batch == 6
    assert factory.steps_per_epoch == -(-128 // 40)
    lab_x = torch.stack([labeled[i][0] for i in range(len(labeled))])
    batches = list(factory.loader(epoch=0))
    assert len(batches) == factory.steps_per_epoch
    for x, y in batches:
        assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32
        # 14 of 20 rows are generated images (recognised by their tag) with their own labels ...
        ids = _decode((x[6:] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        assert ((x[6:, :, 5:, 5:] * 255).round() == torch.from_numpy(ids % 251)[:, None, None, None]).all()
        assert y[6:].tolist() == (ids % 10).tolist()
        # ... and the first 6 are labeled training images.
        for xi in x[:6]:
            assert (lab_x == xi).flatten(1).all(1).any()
    # Loading the epoch kept at most MAX_OPEN_SHARDS shards mapped at once.
    assert factory.dataset.generated.shards.stats.max_open <= 2


def test_a_single_large_shard_hands_its_pages_back(tmp_path, monkeypatch):
    """Random reads into one big shard do not pile up as resident memory: the map's pages are handed back
    every RELEASE_EVERY images (lowered to 4 here), and reads stay exact across releases."""
    import dat_ds.data.generated as generated

    monkeypatch.setattr(generated, "RELEASE_EVERY", 4)
    folder = _write_shards(tmp_path / "gen", [2000])
    shards = GeneratedShards.from_spec(str(folder), max_open=2)
    rng = np.random.default_rng(2)
    for _ in range(10):
        batch = rng.integers(0, 2000, size=20)
        images, labels = shards.read(batch)
        assert _decode(images).tolist() == batch.tolist() and labels.tolist() == (batch % 10).tolist()
    assert shards.stats.opened == 1 and shards.stats.released == 10 * 5


def test_data_loader_workers_read_the_same_mixed_batches(tmp_path):
    """data.num_workers > 0: each worker maps its own shards (the reader pickles without its maps) and the
    batches are exactly those of the in-process loader."""
    folder = _write_shards(tmp_path / "gen", [300, 200, 500])
    batches = {}
    for workers in (0, 2):
        cfg = build_config(overrides=["data.train_subset=128", f"data.unlabeled={folder}", "data.unsup_fraction=0.7",
                                      f"data.num_workers={workers}"])
        labeled, _ = build_dataset(cfg.data, "train")
        factory = build_train_loader(cfg, labeled, micro_batch=20, rank=0, world_size=2)
        batches[workers] = list(factory.loader(epoch=1))
    assert len(batches[2]) == len(batches[0]) == -(-128 // 40)
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
