"""ZeRO-3 evaluation cannot deadlock, whatever the attack does on each rank's data.

Under ZeRO-3 each forward of the engine's module all-gathers parameters, so ranks must make the same number
of forwards. AutoAttack attacks only the examples the model gets right and stops when none is left: a rank
whose examples are all misclassified makes a handful of forwards, another rank hundreds. Evaluation runs on
``Trainer.eval_module()``, weights gathered once, so the ranks no longer need to agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import join_two_rank_world, spawn_two_ranks, write_ds

BATCH = 8


def _worker(rank: int, port: int, tmp: str, use_engine_module: bool) -> None:
    join_two_rank_world(rank, port, LOCAL_WORLD_SIZE="2", DAT_DS_THREADS_PER_RANK="1")
    from torch.utils.data import TensorDataset

    from dat_ds.attacks import AttackSpec
    from dat_ds.core.config import build_config
    from dat_ds.data import build_dataset
    from dat_ds.evaluation.evaluate import evaluate
    from dat_ds.runtime.trainer import Trainer

    ds = write_ds(Path(tmp), zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0})
    cfg = build_config(None, [f"output_dir={tmp}/runs", "name=z3", f"deepspeed_config={ds}", "model.name=tiny_cnn",
                              "data.train_subset=64", "train.save_every_steps=0", "dist.timeout_s=30"])
    trainer = Trainer(cfg).setup()
    test_set, _ = build_dataset(cfg.data, "test")
    x = torch.stack([test_set[i][0] for i in range(2 * BATCH)])
    module = trainer.eval_module()
    with torch.no_grad():
        pred = module(x).argmax(1)
    # batch 0 (rank 0): labels the model predicts, so AutoAttack attacks all of them; batch 1 (rank 1): labels it
    # never predicts, so every stage finds nothing to attack there.
    y = torch.cat([pred[:BATCH], (pred[BATCH:] + 1) % 10])
    model = trainer.engine.module if use_engine_module else trainer.eval_module()
    spec = AttackSpec("autoattack", eps=0.1, extra={"aa_steps": 5, "n_queries": 50})
    result = evaluate(model, TensorDataset(x, y), [spec], batch_size=BATCH)
    if rank == 0:
        Path(tmp, "result.json").write_text(json.dumps({"clean": result.clean_correct.tolist(),
                                                         "robust": result.robust_correct[spec.label].tolist()}))


@pytest.mark.dist
def test_zero3_autoattack_evaluation_ends_when_the_ranks_attack_different_amounts(tmp_path):
    spawn_two_ranks(_worker, str(tmp_path), False)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["clean"] == [True] * BATCH + [False] * BATCH
    assert not any(result["robust"][BATCH:]) and sum(result["robust"]) <= BATCH


def test_the_gathered_copy_is_seen_through_one_view_across_evaluations():
    """fp16's attack view keeps its gradient scale from one evaluation to the next: ZeRO-3's copy is wrapped once."""
    from torch import nn

    from dat_ds.attacks import attack_view
    from dat_ds.runtime.replica import GatheredCopy

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    copy = GatheredCopy(lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), attack_view)
    first = copy.refresh(module)  # parameters without ZeRO-3 attributes: GatheredParameters gathers nothing
    with torch.no_grad():
        module[0].weight.add_(1.0)
        module[1].running_mean.add_(2.0)
    again = copy.refresh(module)
    assert again is first
    x = torch.randn(5, 4)
    module.eval(), again.eval()
    torch.testing.assert_close(again(x).float(), module(x))  # the view sees the refreshed weights and buffers
