"""The CIFAR recipe trains end to end on CIFAR-format fixture files (PreAct ResNet-18, ZeRO 2, 2 ranks)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import REPO


@pytest.mark.slow
@pytest.mark.dist
def test_cifar_recipe_smoke_run_prn18_zero2_two_ranks(tmp_path, cli):
    """PreActResNet-18, ZeRO-2, 2 ranks, a few steps on the 20 real CIFAR-10 images in the python layout."""
    from tests.helpers import foolbox_images, write_python_release

    images, labels = foolbox_images("cifar10")
    write_python_release(tmp_path / "cifar", images, labels)
    # zero2_fp32.json with a micro-batch that fits 20 images on 2 ranks (the recipe's LAMB batch is 2048).
    ds = json.loads((REPO / "ds_configs" / "zero2_fp32.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "zero2_small.json").write_text(json.dumps(ds))
    proc = cli("train", "--config", "recipes/cifar10_prn18_dat_pgd.yaml", "--nproc", "2",
               "--deepspeed_config", str(tmp_path / "zero2_small.json"), "--name", "cifar-smoke",
               "--output-dir", str(tmp_path / "runs"), "--epochs", "1",
               "--set", f"data.root={tmp_path / 'cifar'}", "--set", "data.num_workers=1",
               "--set", "attack.steps=2", "--set", "train.max_steps_per_epoch=2", "--set", "optim.warmup_epochs=0",
               "--set", "optim.lr_scaling=none", "--set", "eval.steps=2", "--set", "eval.batch_size=10",
               timeout=900)  # the recipe's model.channels_last: NHWC inputs, NCHW weights under ZeRO-2
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run = tmp_path / "runs" / "cifar-smoke"
    summary = json.loads((run / "summary.json").read_text())
    final = summary["final"]
    assert summary["world_size"] == 2 and final["eval_count"] == 20
    assert final["train_loss"] > 0 and 0.0 <= final["robust_acc"] <= final["clean_acc"] <= 1.0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["name"] == "preactresnet18" and saved["data"]["name"] == "cifar10"
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert any((run / "checkpoint").iterdir())
