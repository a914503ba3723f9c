"""The DeepSpeed internals dat-ds reads (``runtime/ds_adapter.py``) exist on the installed DeepSpeed.

Each test builds a real one-rank engine and fails with a line naming the attribute a DeepSpeed release renamed,
instead of dat-ds failing deep inside a run (a NaN check that silently sees no gradients, a save that cannot
guard its writes).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dat_ds.core import dist
from dat_ds.runtime import ds_adapter, ds_config

RENAMED = "DeepSpeed no longer has {what}; update dat_ds/runtime/ds_adapter.py"


def _engine(**config):
    import deepspeed

    dist.init_distributed()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    base = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={**base, **config})
    return engine


def _backward(engine) -> None:
    dtype = next(engine.module.parameters()).dtype
    x, y = torch.randn(4, 8, dtype=dtype), torch.tensor([0, 1, 2, 0])
    engine.backward(nn.functional.cross_entropy(engine(x).float(), y))


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_gradient_partitions(stage):
    engine = _engine(zero_optimization={"stage": stage})
    assert isinstance(getattr(engine.optimizer, "averaged_gradients", None), dict), \
        RENAMED.format(what=f"ZeRO-{stage}'s optimizer.averaged_gradients")
    _backward(engine)
    parts = ds_adapter.gradient_partitions(engine.optimizer)
    assert parts and sum(p.numel() for p in parts) >= sum(p.numel() for p in engine.module.parameters())  # + padding


def test_checkpoint_engine_is_swapped_for_a_block_and_put_back():
    engine = _engine()
    assert hasattr(engine, "checkpoint_engine"), RENAMED.format(what="engine.checkpoint_engine")
    inner = engine.checkpoint_engine
    assert ds_adapter.is_torch_checkpoint_engine(inner)
    with pytest.raises(RuntimeError, match="inside"):
        with ds_adapter.checkpoint_engine_swapped(engine, lambda e: ("wrapped", e)):
            assert engine.checkpoint_engine == ("wrapped", inner)
            raise RuntimeError("inside")
    assert engine.checkpoint_engine is inner


def test_zero3_parameters_know_their_full_size():
    engine = _engine(zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0})
    sizes = [ds_adapter.full_numel(p) for p in engine.module.parameters()]
    assert all(hasattr(p, "ds_numel") for p in engine.module.parameters()), RENAMED.format(what="param.ds_numel")
    assert sizes == [8 * 16, 16, 16 * 3, 3]


def test_fp16_loss_scale_and_its_floor(cpu_runs_fp16):
    engine = _engine(fp16={"enabled": True, "initial_scale_power": 5, "min_loss_scale": 2})
    for name in ("dynamic_loss_scale", "dynamic_loss_scale_args", "fp16_enabled", "was_step_applied",
                 "is_gradient_accumulation_boundary"):
        assert callable(getattr(engine, name, None)), RENAMED.format(what=f"engine.{name}()")
    assert ds_adapter.loss_scale(engine) == 32.0 and ds_adapter.min_loss_scale(engine) == 2.0
    static = _engine(fp16={"enabled": True, "loss_scale": 128})
    assert ds_adapter.loss_scale(static) == 128.0 and ds_adapter.min_loss_scale(static) is None


def test_engine_monitor_is_where_the_json_monitors_are(tmp_path):
    engine = _engine()
    assert hasattr(engine, "monitor") and ds_adapter.monitor(engine) is None, RENAMED.format(what="engine.monitor")
    engine = _engine(csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "j"})
    master = ds_adapter.monitor(engine)
    assert master is not None and callable(master.write_events), RENAMED.format(what="engine.monitor.write_events")
    master.write_events([("dat_ds/epoch/robust_acc", 0.5, 3)])
    assert (tmp_path / "j" / "dat_ds_epoch_robust_acc.csv").read_text().splitlines() == ["step,robust_acc", "3,0.5"]


@pytest.mark.parametrize("stage", [0, 2])
def test_a_bf16_engine_attacks_a_batchnorm_model_in_eval_mode(stage, tmp_path):
    """DeepSpeed's bf16 engine casts parameters, not buffers (a fact dat-ds relies on: if this changes, the cast
    is moot); ``build_engine`` then puts BatchNorm's running statistics in bf16, so the attacks' eval-mode forward
    runs (it raised "expected scalar type BFloat16 but found Float" on the CPU)."""
    import json

    from dat_ds.core.config import build_config
    from dat_ds.runtime.build import build_engine

    dist.init_distributed()
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                                "zero_optimization": {"stage": stage}}))
    settings = ds_config.prepare(path, 1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 6, 6))  # materialise the lazy layer
    built = build_engine(build_config(None, []), settings, model, steps_per_epoch=1)
    bn = built.engine.module[1]
    assert bn.weight.dtype == torch.bfloat16 and bn.running_mean.dtype == bn.running_var.dtype == torch.bfloat16
    built.engine.module.eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    (grad,) = torch.autograd.grad(built.engine.module(x).float().sum(), x)
    assert grad.abs().sum() > 0
