"""16-bit training: fp16 under DeepSpeed's loss scaling, bf16 with AutoAttack evaluation, tf32 and deterministic.

Reproduced on the CPU: bf16 runs here as on a GPU; DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has
fp16 kernels, but its fp16 engine (dynamic loss scaling, overflow skips) runs on CPU tensors once the
accelerator says yes, so the fp16 tests say yes for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch

from dat_ds.attacks import AttackPrecision
from dat_ds.core.config import build_config
from dat_ds.core.errors import NonFiniteLossError
from tests.helpers import write_ds


class _BlowUpAt:
    """Wraps an objective: at the given global steps its loss is multiplied by ``factor`` (finite in fp32,
    so only the scaled fp16 gradients overflow -- or, with ``factor=nan``, a diverged loss)."""

    def __init__(self, objective, steps: set[int], factor: float):
        self.inner, self.steps, self.factor = objective, steps, factor
        self.replays = objective.replays

    def __call__(self, ctx, x, y):
        out = self.inner(ctx, x, y)
        if ctx.step + 1 in self.steps:
            out.loss = out.loss * self.factor
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _fp16_trainer(tmp_path, *, scale_power: int = 4, min_scale: int = 1, extra=()):
    from dat_ds.runtime.trainer import Trainer

    ds = write_ds(tmp_path, fp16={"enabled": True, "initial_scale_power": scale_power, "loss_scale_window": 1000,
                                  "hysteresis": 1, "min_loss_scale": min_scale})
    cfg = build_config(None, [f"output_dir={tmp_path / 'runs'}", "name=fp16", f"deepspeed_config={ds}",
                              "model.name=tiny_cnn", "attack.steps=1", "data.train_subset=96", "train.epochs=1",
                              "train.log_every=1", "train.save_every_steps=0", *extra])
    return Trainer(cfg).setup()


def _wrap_objective(trainer, steps: set[int], factor: float) -> None:
    """The built run with its objective's loss multiplied by ``factor`` at ``steps`` (1-based)."""
    trainer.run = dataclasses.replace(trainer.run, objective=_BlowUpAt(trainer.run.objective, steps, factor))


def test_fp16_overflow_is_skipped_by_deepspeed_and_training_goes_on(tmp_path, cpu_runs_fp16, dat_ds_log):
    """A step whose scaled gradients overflow: DeepSpeed skips it and halves the scale; the NaN guard no longer
    calls it divergence (it aborted here before), the step is counted and logged, and training finishes."""
    dat_ds_log.set_level(logging.INFO, logger="dat_ds")
    trainer = _fp16_trainer(tmp_path)
    assert next(trainer.engine.module.parameters()).dtype == torch.float16
    assert isinstance(trainer.run.ctx.module, AttackPrecision)  # attacks take scaled input gradients
    _wrap_objective(trainer, {3}, 1e30)
    summary = trainer.fit()
    assert trainer.state.global_step == 6 and summary["final"]["epoch"] == 1
    assert trainer.state.overflow_steps == 1 and trainer.engine.skipped_steps == 1
    assert trainer.engine.optimizer.loss_scale == 2**4 / 2
    steps = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    assert [r["overflow_steps"] for r in steps] == [0, 0, 1, 1, 1, 1]
    assert [r["loss_scale"] for r in steps] == [16, 16, 8, 8, 8, 8]
    assert "fp16: step 3 overflowed and DeepSpeed skipped it; loss scale now 8 (1 overflow step(s) so far)" in dat_ds_log.text


def test_fp16_a_non_finite_loss_is_still_divergence(tmp_path, cpu_runs_fp16):
    trainer = _fp16_trainer(tmp_path)
    _wrap_objective(trainer, {2}, math.nan)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1 step 2"):
        trainer.fit()


def test_fp16_overflow_at_the_minimum_scale_is_divergence(tmp_path, cpu_runs_fp16):
    """Gradients that overflow whatever the scale: DeepSpeed's scaler gives up at its minimum; one line says so."""
    trainer = _fp16_trainer(tmp_path, scale_power=1, min_scale=1)
    _wrap_objective(trainer, {2, 3, 4, 5}, 1e30)
    with pytest.raises(NonFiniteLossError, match="fp16 gradients overflow even at the minimum loss scale"):
        trainer.fit()


def test_bf16_training_with_autoattack_evaluation(tmp_path):
    """The issue's reproduction: bf16 ZeRO-1 with eval.attack=autoattack ended in torchattacks' TypeError."""
    from dat_ds.evaluation.training import run_training

    ds = write_ds(tmp_path, bf16={"enabled": True}, zero_optimization={"stage": 1})
    cfg = build_config(None, [f"output_dir={tmp_path / 'runs'}", "name=bf16aa", f"deepspeed_config={ds}",
                              "model.name=tiny_cnn", "attack.steps=1", "data.train_subset=32", "train.epochs=1",
                              "train.save_every_steps=0", "eval.attack=autoattack", "eval.steps=3",
                              "eval.max_examples=8", "eval.batch_size=8"])
    summary = run_training(cfg)
    final = summary["final"]
    assert final["robust_attack"].startswith("AutoAttack") and 0 <= final["robust_acc"] <= final["clean_acc"] <= 1


@pytest.fixture
def restore_backends():
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = flags[:4]
    torch.use_deterministic_algorithms(flags[4], warn_only=flags[5])


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("tf32", [False, True])
def test_train_tf32_and_deterministic_set_the_backends(restore_backends, monkeypatch, deterministic, tf32):
    from dat_ds.core.config import TrainConfig
    from dat_ds.runtime import backends

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    line = backends.configure(TrainConfig(tf32=tf32, deterministic=deterministic), "cuda")
    assert torch.backends.cudnn.benchmark is (not deterministic)
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    import os

    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == backends.CUBLAS_WORKSPACE) is deterministic
    assert ("deterministic kernels only" in line) is deterministic and ("TF32" in line) is (tf32 or not deterministic)
    assert backends.configure(TrainConfig(tf32=tf32, deterministic=deterministic), "cpu") is None


def test_a_deterministic_run_trains(tmp_path, restore_backends):
    """train.deterministic=true through the config: the run trains and the process runs deterministic algorithms."""
    from dat_ds.runtime.trainer import Trainer

    cfg = build_config(None, [f"output_dir={tmp_path / 'runs'}", "name=det", f"deepspeed_config={write_ds(tmp_path)}",
                              "model.name=tiny_cnn", "attack.steps=1", "data.train_subset=32", "train.epochs=1",
                              "train.save_every_steps=0", "train.deterministic=true", "train.tf32=false"])
    trainer = Trainer(cfg).setup()
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert trainer.fit()["final"]["epoch"] == 1
