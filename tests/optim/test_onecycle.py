"""The one-cycle LR schedule (Wong et al.'s fast AT): its shape in optimizer steps, the optimizer's LR, its settings."""

from __future__ import annotations

import pytest

from dat_ds.core.config import OptimConfig, build_config
from dat_ds.core.errors import ConfigError


def test_onecycle_rises_to_the_peak_at_two_fifths_and_falls_to_zero_in_optimizer_steps():
    from dat_ds.optim import lr_multiplier
    from dat_ds.optim.schedule import StepPlan

    # Free-AT-like: 10 batches x 2 replays x 5 epochs = 100 optimizer steps; the schedule counts those.
    plan = StepPlan(batches_per_epoch=10, epochs=5, replays=2)
    cfg = OptimConfig(schedule="onecycle")
    lrs = [lr_multiplier(cfg, k, plan.per_epoch, plan.epochs) for k in range(plan.total)]
    assert plan.total == 100 and len(lrs) == 100
    assert lrs[0] == pytest.approx(1 / 40)  # the first step already moves the weights (Wong et al.'s t = i + 1)
    assert lrs[39] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)  # peak at 2/5 = step 40 of 100
    assert lrs[69] == pytest.approx(0.5)  # half-way down: progress 0.7 = 0.4 + 0.6 / 2
    assert lrs[99] == pytest.approx(0.0, abs=1e-12)  # ends at 0
    rises, falls = lrs[:40], lrs[39:]
    assert all(b - a == pytest.approx(1 / 40) for a, b in zip(rises, rises[1:]))  # linear up
    assert all(a - b == pytest.approx(1 / 60) for a, b in zip(falls, falls[1:]))  # linear down
    late = OptimConfig(schedule="onecycle", onecycle_peak=0.25)
    assert lr_multiplier(late, 24, plan.per_epoch, plan.epochs) == pytest.approx(1.0)


def test_onecycle_drives_the_optimizer_lr():
    import torch

    from dat_ds.optim import build_scheduler

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.2)
    sched = build_scheduler(opt, OptimConfig(schedule="onecycle", onecycle_peak=0.5), steps_per_epoch=5, total_epochs=2)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2, 0.16, 0.12, 0.08, 0.04, 0.0])


@pytest.mark.parametrize("overrides, message", [
    (["optim.schedule=onecycle", "optim.warmup_epochs=1"], "optim.schedule=onecycle ramps the LR up itself"),
    (["optim.onecycle_peak=1"], "optim.onecycle_peak=1 must be in (0, 1)"),
    (["optim.onecycle_peak=0"], "optim.onecycle_peak=0 must be in (0, 1)"),
    (["optim.schedule=onecycl"], "allowed: constant, multistep, cosine, onecycle"),
])
def test_onecycle_settings_are_checked_without_torch(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert build_config(None, ["optim.schedule=onecycle"]).optim.onecycle_peak == 0.4
