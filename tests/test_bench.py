"""Benchmark plumbing on tiny sizes: the JSON they write and that the compared arms do the same work.

Speed itself is never asserted here (machines are noisy); `dat-ds bench ...` measures it.
"""

from __future__ import annotations

import argparse
import json

import torch

from dat_ds.bench import step
from dat_ds.bench.common import count_passes, interleaved_timing
from dat_ds.bench.engine_bench import launch_worker


def test_step_arms_do_the_same_passes():
    _, spec, _ = step.CASES["small_cnn-28x28x1"]
    from dat_ds.models import create_model

    model = create_model("small_cnn", spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    counts = {}
    for arm in (step.at_step_ours, step.at_step_naive):
        with count_passes(model) as c:
            arm(model, opt, x, y, eps=0.1, steps=3, generator=torch.Generator().manual_seed(0))
        counts[arm.__name__] = (c.forward, c.backward)
    assert counts["at_step_ours"] == counts["at_step_naive"] == (4, 4)  # 3 attack passes + 1 training pass


def test_naive_arm_really_fills_parameter_grads_and_ours_does_not():
    _, spec, _ = step.CASES["small_cnn-28x28x1"]
    from dat_ds.attacks import pgd
    from dat_ds.models import create_model

    model = create_model("small_cnn", spec)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    pgd(model, x, y, eps=0.1, steps=2, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())


def test_interleaved_timing_reports_every_arm():
    calls = []
    out = interleaved_timing({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, rounds=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(out) == {"a", "b"} and all(v["rounds"] == 3 and v["median_s"] >= 0 for v in out.values())


def test_bench_step_writes_json(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), steps=1, eps=0.1, rounds=1, cases="small_cnn-28x28x1", batch=4)
    step.run(args)
    data = json.loads((tmp_path / "step.json").read_text())
    assert data["benchmark"] == "step" and "machine" in data
    (r,) = data["results"]
    assert r["ours_over_naive"] > 0 and r["pgd_steps"] == 1 and r["batch"] == 4
    assert set(r["timings"]) == {"clean", "ours", "naive"}
    assert (tmp_path / "step.png").stat().st_size > 1000


def test_engine_and_ddp_workers_do_the_same_work():
    kw = dict(steps=2, micro=8, model="tiny_cnn", attack_steps=1)
    ds = launch_worker("deepspeed", 1, **kw)
    ddp = launch_worker("ddp", 1, **kw)
    for r in (ds, ddp):
        assert r["timed_steps"] == 2 and r["samples_per_s"] > 0
    # 5 steps (3 warm-up + 2 timed) x (1 attack pass + adversarial pass + clean pass)
    assert ds["forward_passes_rank0"] == ddp["forward_passes_rank0"] == 15
    assert ds["backward_passes_rank0"] == ddp["backward_passes_rank0"]
