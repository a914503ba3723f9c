"""End to end on the embedded data: the DeepSpeed launcher on 2 ranks, checkpoints, resume, one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dat_ds.core.dist import free_port
from dat_ds.core.io import read_jsonl
from tests.helpers import REPO, latest_model_states, run_cli

SMALL = ["--set", "train.max_steps_per_epoch=6", "--set", "eval.max_examples=128", "--set", "model.name=tiny_cnn",
         "--set", "attack.steps=2", "--set", "train.log_every=2"]


def _launcher(*args: str, tmp: Path) -> "subprocess.CompletedProcess":  # noqa: F821
    import os
    import subprocess

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "dat_ds.train", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_two_ranks_through_the_deepspeed_launcher(tmp_path):
    # channels_last as well: it used to fail on several ranks (DeepSpeed's start-up broadcast views every
    # weight as bytes, which NHWC weights refuse); tests/runtime/test_channels_last.py has the unit tests
    proc = _launcher("--config", "recipes/demo.yaml", "--deepspeed_config", "ds_configs/zero0_fp32.json",
                     "--epochs", "1", "--output-dir", str(tmp_path), "--name", "two", *SMALL,
                     "--set", "model.channels_last=true", tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "model.channels_last: weights and inputs in NHWC" in proc.stdout + proc.stderr
    run = tmp_path / "two"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    where = summary["provenance"]  # a checkout: its commit; the rank's own command line (no dat-ds command here)
    assert len(where["git"]["commit"]) == 40 and where["versions"]["torch"] and where["hosts"]
    assert "dat_ds" in where["command"] and "--config recipes/demo.yaml" in where["command"]
    final = summary["final"]
    assert 0.0 <= final["robust_acc"] <= final["clean_acc"] <= 1.0
    assert final["eval_count"] == 128
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert all(r["samples_per_s"] > 0 for r in steps)
    assert (run / "checkpoint" / "epoch0001" / "complete.json").is_file()
    assert (run / "checkpoint" / "latest").read_text().strip() == "epoch0001"
    assert (run / "config.yaml").is_file() and (run / "curves.png").stat().st_size > 1000


# ~1 min; the default suite's exact-resume tests are in runtime/test_resume.py and launch/test_signals.py
@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path):
    # A schedule that depends on the total epoch count would differ between a 1-epoch and a 2-epoch
    # command, so this test keeps the LR constant; mid-epoch kill-and-resume is tested in runtime/test_resume.py.
    base = ["train", "--config", "recipes/demo.yaml", "--output-dir", str(tmp_path), *SMALL,
            "--set", "optim.schedule=constant", "--set", "optim.warmup_epochs=0"]
    run_cli(*base, "--name", "straight", "--epochs", "2", check=True)
    run_cli(*base, "--name", "split", "--epochs", "1", check=True)
    proc = run_cli(*base, "--name", "split", "--epochs", "2", "--resume", "auto", check=True)
    assert "resumed from" in proc.stderr
    straight, split = (latest_model_states(tmp_path / run)["module"] for run in ("straight", "split"))
    assert straight.keys() == split.keys()
    for k in straight:
        assert torch.equal(straight[k], split[k]), k
    hist = json.loads((tmp_path / "split" / "summary.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]


def test_existing_run_is_not_overwritten(tmp_path):
    base = ["train", "--config", "recipes/demo.yaml", "--output-dir", str(tmp_path), "--name", "r", "--epochs", "1", *SMALL]
    run_cli(*base, check=True)
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    proc = run_cli(*base)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: run folder")
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("args, message", [
    (["--set", "attack.eps=-1"], "error: attack.eps=-1 must be in [0, 1]; eps is in pixel units"),
    (["--set", "attack.bogus=1"], "error: unknown config key 'attack.bogus'"),
    (["--config", "recipes/missing.yaml"], "error: recipe file 'recipes/missing.yaml' not found"),
    (["--deepspeed_config", "ds_configs/missing.json"], "error: DeepSpeed config 'ds_configs/missing.json' not found"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, args, message):
    proc = run_cli("train", "--output-dir", str(tmp_path), *args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_two_rank_error_is_caught_before_launch(tmp_path):
    proc = run_cli("train", "--nproc", "2", "--output-dir", str(tmp_path), "--set", "attack.steps=0")
    assert proc.returncode == 2
    assert "error: attack.steps=0 must be >= 1" in proc.stderr
    assert "deepspeed.launcher" not in proc.stderr  # no ranks were started
