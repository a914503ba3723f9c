"""Unlabeled data (RST): pools, pseudo-label files, mixed batches, the pseudo-label command."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from dat_ds.core.config import build_config
from dat_ds.core.errors import ConfigError
from dat_ds.data import build_dataset
from dat_ds.data.loaders import build_train_loader
from dat_ds.data.unlabeled import (
    MixedBatchSampler,
    MixedTrainLoaderFactory,
    PseudoLabeled,
    load_pool,
    load_pseudo_labels,
    save_pseudo_labels,
)
from tests.helpers import run_cli


def _fake(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return PseudoLabeled(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n),
                         rng.random(n).astype(np.float32), {"teacher": "unit-test", "count": n})


def test_pseudo_label_file_round_trips(tmp_path):
    data = _fake()
    path = save_pseudo_labels(tmp_path / "pl.npz", data)
    back = load_pseudo_labels(path)
    assert np.array_equal(back.images, data.images) and np.array_equal(back.labels, data.labels)
    assert np.array_equal(back.confidences, data.confidences) and back.meta == data.meta
    assert back.labels.dtype == np.int64
    assert [p.name for p in tmp_path.iterdir()] == ["pl.npz"]  # atomic write leaves no temp file
    with np.load(path, allow_pickle=False) as z:  # readable without pickle by anyone
        assert set(z.files) == {"images", "labels", "confidences", "meta"}


def test_pickle_files_are_refused_unless_trusted(tmp_path):
    data = _fake(20)
    path = tmp_path / "rst.pickle"
    path.write_bytes(pickle.dumps({"data": data.images, "extrapolated_targets": data.labels.tolist()}))
    with pytest.raises(ConfigError, match="trust_pickle"):
        load_pseudo_labels(path)
    back = load_pseudo_labels(path, trust_pickle=True)
    assert np.array_equal(back.labels, data.labels) and np.array_equal(back.images, data.images)
    obj = tmp_path / "object.npz"
    np.savez(obj, images=data.images, labels=np.array([object()] * 20, dtype=object))
    with pytest.raises(ConfigError, match="without pickle"):
        load_pseudo_labels(obj)


def test_embedded_pool_spec_is_the_rest_of_the_training_split():
    images, labels = load_pool("embedded:train[1000:]")
    full, _ = build_dataset(build_config(overrides=[]).data, "train")
    assert images.shape == (len(full) - 1000, 28, 28, 1) and images.dtype == np.uint8
    assert torch.equal(torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255, full[1000][0])
    assert labels is not None and len(labels) == len(images)
    for bad in ("embedded:val[0:]", "nowhere:train[1:]", "missing.npz", "embedded:train[10000:]"):
        with pytest.raises(ConfigError):
            load_pool(bad)


@pytest.mark.parametrize("world,batch,fraction", [(1, 64, 0.5), (2, 64, 0.3), (3, 10, 0.75)])
def test_every_micro_batch_holds_the_configured_fraction(world, batch, fraction):
    n_lab, n_unl = 200, 900
    k = round(fraction * batch)
    samplers = [MixedBatchSampler(n_lab, n_unl, labeled_per_batch=batch - k, unlabeled_per_batch=k, rank=r,
                                  world_size=world, seed=3) for r in range(world)]
    per_rank = []
    for s in samplers:
        s.set_epoch(2)
        batches = list(s)
        assert len(batches) == s.steps == (n_lab + n_unl) // (world * batch) == len(s)  # same steps on every rank
        for b in batches:
            assert len(b) == batch
            assert sum(i >= n_lab for i in b) == k  # exactly round(f * B) pseudo-labelled examples
        per_rank.append(batches)
    # Within one pass over the unlabeled pool the ranks draw disjoint examples.
    first = [i for batches in per_rank for b in batches for i in b if i >= n_lab][: (n_unl // world) * world]
    unl = [[i for b in batches for i in b if i >= n_lab][: n_unl // world] for batches in per_rank]
    flat = [i for u in unl for i in u]
    assert len(set(flat)) == len(flat) and first
    # Resuming at step 3 replays exactly the rest of the epoch; another epoch is another order.
    s = samplers[0]
    s.set_epoch(2, start_step=3)
    assert list(s) == per_rank[0][3:]
    s.set_epoch(3)
    assert list(s) != per_rank[0]


def test_training_loader_mixes_pseudo_labels(tmp_path):
    data = _fake(300)
    path = save_pseudo_labels(tmp_path / "pl.npz", data)
    cfg = build_config(overrides=["data.train_subset=100", f"data.unlabeled={path}", "data.unsup_fraction=0.25"])
    labeled, _ = build_dataset(cfg.data, "train")
    factory = build_train_loader(cfg, labeled, micro_batch=16, rank=1, world_size=2)
    assert isinstance(factory, MixedTrainLoaderFactory)
    assert factory.steps_per_epoch == (100 + 300) // 32
    pseudo_x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    for x, y in factory.loader(epoch=0):
        assert x.shape == (16, 1, 28, 28) and y.shape == (16,)
        # the last 4 = round(0.25 * 16) rows are pseudo-labelled pool images carrying their pseudo-labels
        for xi, yi in zip(x[12:], y[12:]):
            match = (pseudo_x == xi).flatten(1).all(1).nonzero().flatten()
            assert len(match) >= 1 and int(yi) in data.labels[match.numpy()]
    bad = build_config(overrides=[f"data.unlabeled={path}", "data.unsup_fraction=0.99"])
    with pytest.raises(ConfigError, match="no labeled example"):
        build_train_loader(bad, labeled, micro_batch=16, rank=0, world_size=1)


@pytest.fixture(scope="module")
def clean_teacher():
    """small_cnn after one clean epoch on 2,000 embedded training images (a few seconds)."""
    import torch.nn.functional as F

    from dat_ds.models import create_model

    train, spec = build_dataset(build_config(overrides=["data.train_subset=2000"]).data, "train")
    torch.manual_seed(0)
    model = create_model("small_cnn", spec)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for x, y in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True,
                                            generator=torch.Generator().manual_seed(0)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_pseudo_label_command_writes_a_loadable_file(tmp_path, clean_teacher):
    weights = tmp_path / "teacher.pt"
    torch.save(clean_teacher.backbone.state_dict(), weights)
    out = tmp_path / "pl.npz"
    proc = run_cli("pseudo-label", "--weights", str(weights), "--model", "small_cnn", "--pool",
                   "embedded:train[9000:]", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = load_pseudo_labels(out)
    images, true = load_pool("embedded:train[9000:]")
    assert np.array_equal(data.images, images) and len(data.labels) == 1000
    assert ((data.confidences > 0.09) & (data.confidences <= 1)).all()
    # A trained teacher's labels agree with the withheld ones far above chance (10%).
    assert data.meta["pseudo_label_accuracy"] == pytest.approx(float((data.labels == true).mean()))
    assert data.meta["pseudo_label_accuracy"] > 0.6
    refused = run_cli("pseudo-label", "--weights", str(weights), "--pool", "embedded:train[9000:]", "--out", str(out))
    assert refused.returncode == 2 and "--model" in refused.stderr


@pytest.mark.slow
@pytest.mark.dist
def test_two_rank_training_with_pseudo_labels(tmp_path):
    import json

    data = _fake(400)
    path = save_pseudo_labels(tmp_path / "pl.npz", data)
    proc = run_cli("train", "--nproc", "2", "--config", "recipes/rst_embedded.yaml", "--set", f"data.unlabeled={path}",
                   "--set", "data.train_subset=300", "--set", "model.name=tiny_cnn", "--set", "attack.steps=1",
                   "--set", "eval.max_examples=64", "--set", "train.log_every=1", "--epochs", "1",
                   "--output-dir", str(tmp_path), "--name", "rst")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    steps = [json.loads(line) for line in (tmp_path / "rst" / "metrics.jsonl").read_text().splitlines()]
    # (300 labeled + 400 pseudo-labelled) // (2 ranks x 64) = 5 steps, each rank on 32 + 32 examples
    assert [r["step"] for r in steps if r["kind"] == "step"] == [1, 2, 3, 4, 5]
