"""``dat-ds bench zero3``: its all-gather counter, its goals, and (slow) the JSON of a tiny run on 2 ranks."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import zero3
from tests.bench.test_bench import run_bench


def test_all_gathers_are_counted_once_by_their_output_bytes():
    import torch.distributed as tdist
    from deepspeed.comm import comm as ds_comm

    from dat_ds.core import dist

    dist.init_distributed()  # one rank: gloo gathers to itself
    out, x = torch.empty(6), torch.arange(6.0)
    counter = zero3.AllGatherBytes().install()
    try:
        tdist.all_gather_into_tensor(out, x)
        tdist.all_gather([torch.empty(3, dtype=torch.float64)], torch.ones(3, dtype=torch.float64))
        ds_comm.all_gather_into_tensor(out, x)  # DeepSpeed's wrapper, then torch's: one call
    finally:
        counter.uninstall()
    assert torch.equal(out, x)
    assert (counter.calls, counter.bytes) == (3, 24 + 24 + 24)
    tdist.all_gather_into_tensor(out, x)  # uninstalled: no longer counted
    assert counter.calls == 3 and tdist.all_gather_into_tensor.__name__ != "counted"


def _row(stage: int, gathered: bool, k: int, ratio: float, seconds: float) -> dict:
    return {"arm": "x", "zero_stage": stage, "gathered": gathered, "steps": k, "allgather_bytes_per_step": ratio * 100,
            "param_bytes": 100, "allgather_over_param_bytes": ratio, "step_seconds": seconds}


def test_the_goals_read_the_largest_k():
    rows = [_row(2, False, 1, 1.0, 1.0), _row(3, True, 1, 9.0, 9.0),
            _row(2, False, 10, 1.0, 2.0), _row(3, False, 10, 16.0, 4.0), _row(3, True, 10, 2.5, 2.4)]
    goals = zero3._goals(rows)
    assert goals["steps"] == 10
    assert goals["bytes"] == {"max_over_param_bytes": 3.0, "measured": 2.5, "met": True}
    assert goals["time"]["measured"] == pytest.approx(1.2) and goals["time"]["met"]
    assert goals["time"]["by_steps"] == {"1": 9.0, "10": pytest.approx(1.2)}


@pytest.mark.slow
@pytest.mark.dist
def test_bench_zero3_writes_one_row_per_arm_and_k(tmp_path):
    run_bench("zero3", ["--out", str(tmp_path), "--ks", "1", "--steps", "1", "--warmup", "1", "--width", "16",
                        "--micro", "4"])
    data = json.loads((tmp_path / "zero3.json").read_text())
    assert data["benchmark"] == "zero3" and data["nproc"] == 2 and data["loadavg_before"]
    assert (tmp_path / "zero3.png").stat().st_size > 0
    rows = data["results"]
    assert [(r["zero_stage"], r["gathered"], r["steps"]) for r in rows] == [(2, False, 1), (3, False, 1), (3, True, 1)]
    for r in rows:
        assert {"zero_stage", "gathered", "steps", "allgather_bytes_per_step", "param_bytes", "step_seconds"} <= set(r)
        assert r["param_bytes"] == 4 * (784 * 16 + 16 + 2 * (16 * 16 + 16) + 16 * 10 + 10)
        assert r["allgather_bytes_per_step"] > 0 and r["step_seconds"] > 0
    assert set(data["goals"]) == {"steps", "bytes", "time"}
