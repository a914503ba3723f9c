"""NaN/inf: handled by ``train.nan_policy``. ``abort`` notes the first non-finite loss or gradient on the
device and raises at the next log step, checkpoint save or epoch end, naming the step it happened in;
no checkpoint is written after it, so the last one is the last good state. ``skip`` drops the step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dat_ds import cli
from dat_ds.core import dist
from dat_ds.core.io import read_jsonl
from dat_ds.objectives import OBJECTIVES
from dat_ds.objectives.base import Objective, ObjectiveOutput
from dat_ds.runtime import checkpoint
from tests.helpers import model_state, tiny_args, write_ds

dist.setup_logging()
POISON = {"step": 5, "where": "loss"}  # 0-based global step at which the test objective misbehaves


class _InfGrad(torch.autograd.Function):
    """Identity forward; infinite gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class PoisonedClean(Objective):
    """Clean training whose loss (or gradient) turns non-finite at global step POISON['step'] only."""

    def __call__(self, ctx, x, y):
        logits = ctx.model(x)
        hit = ctx.step == POISON["step"]
        if hit and POISON["where"] == "grad":
            logits = _InfGrad.apply(logits)
        loss = F.cross_entropy(logits.float(), y)
        if hit and POISON["where"] == "loss":
            loss = loss * float("nan")
        return ObjectiveOutput(loss=loss, logits=logits)


if "test_poisoned" not in OBJECTIVES:
    OBJECTIVES.register("test_poisoned")(PoisonedClean)


def run(tmp_path, name, *extra):
    ds = write_ds(tmp_path)
    return cli.main(["train", *tiny_args(tmp_path / "runs", name, ds, "--set", "objective.name=test_poisoned",
                                         "--set", "attack.name=none", *extra, save_every=2)])


def test_abort_on_nan_loss_keeps_last_good_checkpoint(tmp_path, capsys):
    POISON.update(step=5, where="loss")
    rc = run(tmp_path, "abort")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert err == ["error: non-finite loss at epoch 1 step 6 (global step 6); the last checkpoint is the last good "
                   "state. Lower the LR, or set train.nan_policy=skip to skip such steps"]
    root = tmp_path / "runs" / "abort" / "checkpoint"
    assert [t for _, t in checkpoint.complete_tags(root)] == ["step000000002", "step000000004"]
    assert (root / "latest").read_text().strip() == "step000000004"
    assert all(torch.isfinite(v).all() for v in model_state(root / "step000000004").values())


def test_abort_on_inf_gradient(tmp_path, capsys):
    POISON.update(step=3, where="grad")
    rc = run(tmp_path, "abort_grad")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and err[0].startswith("error: non-finite gradient at epoch 1 step 4")
    root = tmp_path / "runs" / "abort_grad" / "checkpoint"
    assert [t for _, t in checkpoint.complete_tags(root)] == ["step000000002"]


def test_skip_policy_drops_the_step_and_counts_it(tmp_path):
    POISON.update(step=5, where="grad")
    assert run(tmp_path, "skip", "--set", "train.nan_policy=skip") == 0
    root = tmp_path / "runs" / "skip" / "checkpoint"
    # 12 batches, 11 optimizer steps (the poisoned one never reached engine.step), finite weights
    states = torch.load(root / "epoch0002" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert states["global_step"] == 12 and states["global_steps"] == 11 and states["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in states["module"].values())
    rows = [r for r in read_jsonl(tmp_path / "runs" / "skip" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["skipped_steps"] for r in rows] == [0] * 5 + [1] * 7


def test_abort_names_the_bad_step_when_it_is_noticed_later(tmp_path, capsys):
    """log_every=5: the NaN loss of global step 3 is first seen by the check before step 4's save."""
    POISON.update(step=2, where="loss")
    rc = run(tmp_path, "deferred", "--set", "train.log_every=5")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert len(err) == 1 and err[0].startswith("error: non-finite loss at epoch 1 step 3 (global step 3);"), err
    root = tmp_path / "runs" / "deferred" / "checkpoint"
    assert [t for _, t in checkpoint.complete_tags(root)] == ["step000000002"]  # nothing saved after step 3
    assert all(torch.isfinite(v).all() for v in model_state(root / "step000000002").values())
    metrics = tmp_path / "runs" / "deferred" / "metrics.jsonl"
    assert not metrics.exists() or not [r for r in read_jsonl(metrics) if r["kind"] == "step"]


def test_abort_noticed_at_a_log_step_between_saves(tmp_path, capsys):
    """No save between the bad step and the log step that notices it: the error still names the bad step."""
    POISON.update(step=4, where="grad")
    rc = run(tmp_path, "at_log", "--set", "train.log_every=3", "--set", "train.save_every_steps=4")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1
    assert err[0].startswith("error: non-finite gradient at epoch 1 step 5 (global step 5);"), err
    root = tmp_path / "runs" / "at_log" / "checkpoint"
    assert [t for _, t in checkpoint.complete_tags(root)] == ["step000000004"]
    steps = [r["step"] for r in read_jsonl(tmp_path / "runs" / "at_log" / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == [3]  # the step-6 record would have covered the bad step: it is never written
