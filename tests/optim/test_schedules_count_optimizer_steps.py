"""LR schedules count optimizer steps, replays included (issue 15, fix 1).

The loop calls ``engine.step()`` once per replay and DeepSpeed steps the scheduler on every call, so a
Free-AT run with m replays takes m optimizer steps per batch. A schedule built from batches ran m times
too fast: cosine reached 0 a quarter of the way through an m = 4 run, and ``cifar10_free.yaml``'s
milestones (epochs 12 and 19 of 25) fired at epochs 1.5 and 2.4.
"""

from __future__ import annotations

import json
import math

import pytest

from dat_ds.core.config import build_config
from dat_ds.optim import lr_multiplier
from dat_ds.optim.schedule import StepPlan
from tests.helpers import REPO, write_ds

LR = 0.002  # tests.helpers.TINY_DS
MICRO, BATCHES, EPOCHS, REPLAYS = 16, 8, 2, 4


@pytest.mark.parametrize("batches, epochs, replays, accum, per_epoch, total", [
    (8, 2, 1, 1, 8, 16),
    (8, 2, 4, 1, 32, 64),  # Free-AT, m = 4: every replay is an optimizer step
    (8, 2, 4, 2, 16, 32),  # ... and DeepSpeed steps once every `accum` engine.step() calls
    (5, 2, 1, 2, 2.5, 5),  # the accumulation boundary runs across epochs: 2.5 steps an epoch, 5 in all
    (1, 3, 1, 4, 0.25, 0),
])
def test_step_plan_counts_optimizer_steps(batches, epochs, replays, accum, per_epoch, total):
    plan = StepPlan(batches, epochs, replays=replays, grad_accum=accum)
    assert plan.per_epoch == per_epoch
    assert plan.total == total


def test_step_plan_refuses_nonsense():
    with pytest.raises(ValueError, match="replays"):
        StepPlan(8, 2, replays=0)


def test_cifar10_free_milestones_fire_at_the_epochs_written():
    cfg = build_config(REPO / "dat_ds" / "recipes" / "cifar10_free.yaml")
    assert cfg.optim.milestones == (12, 19) and cfg.objective.replays == 8
    batches = 50_000 // 128
    plan = StepPlan(batches, cfg.train.epochs, replays=cfg.objective.replays)
    lrs = [lr_multiplier(cfg.optim, k, plan.per_epoch, cfg.train.epochs) for k in range(plan.total)]
    drops = [k for k in range(1, plan.total) if lrs[k] < lrs[k - 1] * 0.99]
    assert [k / plan.per_epoch for k in drops] == pytest.approx([12, 19], abs=1 / plan.per_epoch)
    # Counting batches instead (the old schedule) fired them m = 8 times too early: epochs 1.5 and 2.4.
    old = [lr_multiplier(cfg.optim, k, batches, cfg.train.epochs) for k in range(plan.total)]
    old_drops = [k for k in range(1, plan.total) if old[k] < old[k - 1] * 0.99]
    assert [k / plan.per_epoch for k in old_drops] == pytest.approx([1.5, 2.375], abs=1 / plan.per_epoch)


def _free_run(tmp_path, *overrides: str) -> tuple[list[dict], list[dict]]:
    """A Free-AT run in this process (1 rank): 2 epochs x 8 batches x 4 replays; its step and epoch records."""
    from dat_ds.runtime.trainer import Trainer

    cfg = build_config(REPO / "dat_ds" / "recipes" / "free_embedded.yaml", [
        f"output_dir={tmp_path / 'runs'}", "name=free-lr", f"deepspeed_config={write_ds(tmp_path)}",
        "model.name=tiny_cnn", f"objective.replays={REPLAYS}", f"data.train_subset={MICRO * BATCHES}",
        f"train.epochs={EPOCHS}", "train.log_every=1", "train.save_every_steps=0", "train.keep_last=1",
        *overrides])
    Trainer(cfg).fit()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "step"], [r for r in records if r["kind"] == "epoch"]


def test_free_at_cosine_spans_every_optimizer_step(tmp_path):
    steps, epochs = _free_run(tmp_path, "optim.schedule=cosine", "optim.warmup_epochs=0")
    total = BATCHES * EPOCHS
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    # After batch b the run is b / total of the way through, whatever the number of replays.
    want = [LR * 0.5 * (1 + math.cos(math.pi * b / total)) for b in range(1, total + 1)]
    assert [r["lr"] for r in steps] == pytest.approx(want, rel=1e-6, abs=1e-12)
    # Half the LR half-way, and 0 only at the very end (counting batches, it was 0 from batch 4 on).
    assert steps[total // 2 - 1]["lr"] == pytest.approx(LR / 2)
    assert all(r["lr"] > 1e-5 for r in steps[:-1]) and steps[-1]["lr"] == pytest.approx(0, abs=1e-12)
    assert [r["optimizer_steps"] for r in epochs] == [BATCHES * REPLAYS, 2 * BATCHES * REPLAYS]


def test_free_at_warmup_and_milestones_fire_at_the_epochs_written(tmp_path):
    steps, _ = _free_run(tmp_path, "optim.schedule=multistep", "optim.milestones=[1.0, 1.5]", "optim.gamma=0.1",
                         "optim.warmup_epochs=0.5")
    warmup_steps = 0.5 * BATCHES * REPLAYS  # half an epoch of optimizer steps

    def want(b: int) -> float:  # LR after batch b, i.e. after REPLAYS * b optimizer steps
        epoch = b / BATCHES
        if epoch < 0.5:
            return LR * (REPLAYS * b + 1) / warmup_steps
        return LR * 0.1 ** sum(epoch >= m for m in (1.0, 1.5))

    assert [r["lr"] for r in steps] == pytest.approx([want(b) for b in range(1, BATCHES * EPOCHS + 1)], rel=1e-6)
    # Concretely: ramping for the first 4 batches, full LR through epoch 1, x0.1 from batch 8, x0.01 from 12.
    assert [round(r["lr"] / LR, 6) for r in steps[2:13]] == [0.8125, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01]


def _accum_cfg(tmp_path, *overrides):
    return build_config(REPO / "dat_ds" / "recipes" / "demo.yaml", [
        f"output_dir={tmp_path / 'runs'}", "name=accum", f"deepspeed_config={write_ds(tmp_path, gradient_accumulation_steps=2)}",
        "model.name=tiny_cnn", "attack.steps=1", f"data.train_subset={MICRO * 5}", "train.epochs=2", "train.log_every=1",
        "train.keep_last=1", "eval.max_examples=16", "eval.steps=1", *overrides])


def test_accumulation_epochs_end_on_an_optimizer_step(tmp_path, dat_ds_log):
    """5 batches an epoch, 2 per optimizer step: 4 are trained, so no checkpoint falls between two steps."""
    import logging

    from dat_ds.optim.schedule import accumulation_unit
    from dat_ds.runtime.trainer import Trainer

    assert [accumulation_unit(a, r) for a, r in ((1, 1), (2, 1), (4, 2), (2, 4), (3, 2))] == [1, 2, 2, 1, 3]
    dat_ds_log.set_level(logging.INFO, logger="dat_ds")
    cfg = _accum_cfg(tmp_path, "train.save_every_steps=2")
    Trainer(cfg).fit()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 9))
    assert [r["optimizer_steps"] for r in records if r["kind"] == "epoch"] == [2, 4]
    assert "gradient_accumulation_steps=2: 4 of the epoch's 5 batches are trained" in dat_ds_log.text


def test_a_save_between_two_accumulated_steps_is_refused_before_anything_is_written(tmp_path):
    from dat_ds.core.errors import ConfigError
    from dat_ds.runtime.trainer import Trainer

    cfg = _accum_cfg(tmp_path, "train.save_every_steps=3")
    with pytest.raises(ConfigError, match=r"train.save_every_steps=3 would save between two optimizer steps "
                                          r"\(gradient_accumulation_steps=2: one every 2 batch\(es\)\).*multiple of 2"):
        Trainer(cfg).fit()
    assert not cfg.run_dir.exists()
