"""NaN/inf: caught in the step it appears (loss before backward, gradients before the optimizer step)
and handled by ``train.nan_policy``: ``abort`` keeps the last good checkpoint, ``skip`` drops the step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dat_ds import cli
from dat_ds.core import dist
from dat_ds.runtime import checkpoint
from dat_ds.core.io import read_jsonl
from dat_ds.objectives import OBJECTIVES
from dat_ds.objectives.base import Objective
from reliability_utils import model_state, tiny_args, write_ds

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
        return {"loss": loss, "logits": logits}


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
    states = torch.load(root / "epoch0001" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert states["global_step"] == 12 and states["global_steps"] == 11 and states["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in states["module"].values())
    rows = [r for r in read_jsonl(tmp_path / "runs" / "skip" / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["skipped_steps"] for r in rows] == [0] * 5 + [1] * 7
