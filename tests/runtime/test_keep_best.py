"""train.keep_best=robust (Rice et al. 2020): a seeded validation split carved out of the training set (never
the test set), the best epoch's checkpoint kept as ``best`` through pruning, eval/export defaulting to it;
and ``dat-ds export`` recording ``model.act`` so ``dat-ds eval --weights`` rebuilds a SiLU model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dat_ds import cli
from dat_ds.core.config import build_config
from dat_ds.core.errors import ConfigError
from dat_ds.data.split import validation_indices
from dat_ds.evaluation import training as eval_training
from dat_ds.runtime import build as build_module
from dat_ds.runtime import checkpoint
from dat_ds.runtime import trainer as trainer_module
from tests.helpers import write_ds

SUBSET, VAL = 128, 32


def test_split_is_seeded_disjoint_and_validated():
    train, val = validation_indices(SUBSET, VAL, seed=0)
    assert len(val) == VAL and len(train) == SUBSET - VAL
    assert not set(train) & set(val) and sorted(train + val) == list(range(SUBSET))
    assert validation_indices(SUBSET, VAL, seed=0) == (train, val)  # every rank, every resume: the same split
    assert validation_indices(SUBSET, VAL, seed=1)[1] != val
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        validation_indices(10, 10, seed=0)
    assert build_config(None, []).train.keep_best == "none"
    for overrides, message in ((["train.keep_best=last"], "allowed: none, robust"),
                               (["train.keep_best=robust", "train.val_examples=0"], "must be >= 1"),
                               (["train.keep_best=robust", "objective.name=acl"], "trains none"),
                               (["train.keep_best=robust", "data.train_subset=100", "train.val_examples=100"],
                                "leaves nothing to train on")):
        with pytest.raises(ConfigError, match=message):
            build_config(None, overrides)


def _mark(root: Path, tag: str, step: int) -> None:
    (root / tag).mkdir(parents=True)
    (root / tag / checkpoint.COMPLETE).write_text(json.dumps({"tag": tag, "global_step": step, "epoch": 0}))


def test_prune_never_deletes_the_best_tag(tmp_path):
    root = tmp_path / "checkpoint"
    for i in range(4):
        _mark(root, f"epoch{i:04d}", 10 * (i + 1))
    (root / checkpoint.BEST).write_text("epoch0001\n")
    checkpoint._prune(root, keep_last=1, keep="epoch0003")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["epoch0001", "epoch0003"]
    assert checkpoint.best_tag(root) == "epoch0001"
    (root / checkpoint.BEST).write_text("epoch0000\n")  # a pointer to a pruned (incomplete) tag names nothing
    assert checkpoint.best_tag(root) is None


@pytest.fixture(scope="module")
def best_run(tmp_path_factory):
    """3 epochs with keep_best=robust and keep_last=1, the test split unreachable: building it raises. The
    validation robust accuracy is made to fall after epoch 1 (the real evaluation runs; its robust count is then
    set to 3, 2, 1 correct), so best is epoch 1, which pruning must keep."""
    folder = tmp_path_factory.mktemp("best")
    mp = pytest.MonkeyPatch()
    real_build, real_evaluate = build_module.build_dataset, eval_training.evaluate
    splits, evaluated = [], []

    def build_dataset(data_cfg, split):
        splits.append(split)
        if split == "test":
            raise AssertionError("keep_best read the test split")
        return real_build(data_cfg, split)

    def evaluate(model, dataset, specs, **kw):
        evaluated.append(dataset)
        result = real_evaluate(model, dataset, specs, **kw)
        left = 3 - len(evaluated) + 1
        for label in result.robust_correct:
            result.robust_correct[label] = torch.arange(result.count) < left
        return result

    mp.setattr(build_module, "build_dataset", build_dataset)
    mp.setattr(eval_training, "evaluate", evaluate)
    try:
        cfg = build_config(None, [f"output_dir={folder / 'runs'}", "name=best", f"deepspeed_config={write_ds(folder)}",
                                  "model.name=tiny_cnn", "attack.steps=1", f"data.train_subset={SUBSET}",
                                  "train.keep_best=robust", f"train.val_examples={VAL}", "train.keep_last=1",
                                  "train.epochs=3", "train.log_every=1", "eval.steps=1", "eval.batch_size=16"])
        trainer = trainer_module.Trainer(cfg).setup()
        summary = trainer.fit([eval_training.BestCheckpoint(cfg, trainer.val_set)])
    finally:
        mp.undo()
    return {"cfg": cfg, "trainer": trainer, "summary": summary, "splits": splits, "evaluated": evaluated}


def test_validation_split_is_held_out_training_data_never_the_test_set(best_run):
    trainer = best_run["trainer"]
    assert best_run["splits"] == ["train"]  # the test split was never built
    assert all(ds is trainer.val_set for ds in best_run["evaluated"]) and len(best_run["evaluated"]) == 3
    train_idx, val_idx = trainer.run.loaders.dataset.indices, trainer.val_set.indices
    assert len(val_idx) == VAL and len(train_idx) == SUBSET - VAL
    assert not set(train_idx) & set(val_idx)
    assert trainer.val_set.dataset is trainer.run.loaders.dataset.dataset  # both from the training set (no augment)
    val_images = {trainer.val_set[i][0].numpy().tobytes() for i in range(VAL)}
    seen = 0
    for x, _ in trainer.run.loaders.loader(0):  # what the training loop drew in an epoch: no validation image
        for image in x:
            assert image.numpy().tobytes() not in val_images
            seen += 1
    assert seen == trainer.steps_per_epoch * 16 == SUBSET - VAL


def test_best_survives_pruning_and_is_in_the_summary(best_run):
    cfg, summary = best_run["cfg"], best_run["summary"]
    root = cfg.run_dir / "checkpoint"
    assert checkpoint.best_tag(root) == "epoch0001"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["epoch0001", "epoch0003"]  # keep_last=1 + best
    assert summary["best"] == {"epoch": 1, "tag": "epoch0001", "val_robust_acc": 3 / VAL,
                               "val_clean_acc": summary["history"][0]["val_clean_acc"]}
    assert [h["best"] for h in summary["history"]] == [True, False, False]
    assert [h["val_robust_acc"] for h in summary["history"]] == [3 / VAL, 2 / VAL, 1 / VAL]
    assert json.loads((cfg.run_dir / "summary.json").read_text())["best"]["tag"] == "epoch0001"


def test_eval_and_export_default_to_best_and_tag_wins(best_run, tmp_path, capsys):
    from dat_ds.evaluation.loading import load_run

    run = best_run["cfg"].run_dir
    loaded = load_run(run)
    assert loaded.source["tag"] == "epoch0001" and loaded.source["tag_choice"] == "best"
    assert load_run(run, "epoch0003").source["tag_choice"] == "given"
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "best checkpoint by validation robust accuracy" in capsys.readouterr().out
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["source"].endswith("epoch0001") and meta["best"] is True
    assert cli.main(["eval", "--run", str(run), "--attacks", "fgsm", "--max-examples", "16",
                     "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["source"]["tag"] == "epoch0001"
    assert cli.main(["eval", "--run", str(run), "--tag", "epoch0003", "--attacks", "fgsm", "--max-examples", "16",
                     "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "eval.json").read_text())["source"]["tag"] == "epoch0003"


def test_exported_silu_model_is_evaluated_with_silu(tmp_path, capsys):
    """export records model.act; eval --weights reads it from the .json next to the weights."""
    from dat_ds.evaluation.loading import load_run, load_weights

    ds = write_ds(tmp_path)
    assert cli.main(["train", "--name", "silu", "--output-dir", str(tmp_path / "runs"), "--ds-config", str(ds),
                     "--epochs", "1", "--set", "model.name=wideresnet16_4", "--set", "model.act=silu",
                     "--set", "data.train_subset=16", "--set", "attack.steps=1", "--set", "eval.steps=1",
                     "--set", "eval.max_examples=8", "--set", "eval.batch_size=8"]) == 0
    out = tmp_path / "silu.safetensors"
    assert cli.main(["export", "--run", str(tmp_path / "runs" / "silu"), "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["act"] == "silu"
    loaded = load_weights(out, "wideresnet16_4", "fashion-mnist")
    assert loaded.source["act"] == "silu"
    acts = {type(m).__name__ for m in loaded.model.modules()}
    assert "SiLU" in acts and "ReLU" not in acts
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():  # the same function as the trained model
        assert torch.allclose(loaded.model(x), load_run(tmp_path / "runs" / "silu").model(x), atol=1e-5)
    out.with_suffix(".json").unlink()  # without the metadata: built as the model's default (ReLU)
    relu = load_weights(out, "wideresnet16_4", "fashion-mnist")
    assert relu.source["act"] == "relu"
