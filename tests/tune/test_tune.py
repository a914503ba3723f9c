"""``dat-ds tune``: the search on a fake measure (optimum, budget, pruning, OOM, cache), the JSONs it writes,
and one real tiny tune through the launcher."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dat_ds.core.errors import ConfigError
from dat_ds.runtime import ds_config
from dat_ds.tune import search as tune
from dat_ds.tune.search import OK, OOM, PRUNED, Budget, Point, Result, Space, point_ds_json
from tests.helpers import REPO

BASE = {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.002, "betas": [0.9, 0.999], "weight_decay": 0.0001}},
        "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}
START = Point(micro=64, accum=1, global_batch=128, zero=0, ranks=2, threads=1)
SPACE = Space(micro=tune.powers_of_two(128), zero=[0, 1, 2, 3], channels_last=[False, True], workers=[0, 1],
              layout=[(2, 1), (1, 2)])


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeMeasure:
    """samples/s from a formula; each measurement advances the fake clock by its cost."""

    def __init__(self, clock: FakeClock, *, oom_from: int = 10**9, cost_s: float = 10.0):
        self.clock, self.oom_from, self.cost_s = clock, oom_from, cost_s
        self.calls: list[tuple[Point, float | None]] = []

    def speed(self, p: Point) -> float:
        s = 100.0 * min(p.micro, 32) ** 0.5 * (0.9 if p.micro > 32 else 1.0)  # the best micro-batch: 32
        s *= {0: 1.0, 1: 1.3, 2: 0.9, 3: 0.7}[p.zero]  # ZeRO-1 is the best stage here
        s *= 1.1 if p.channels_last else 1.0
        s *= 0.8 if p.workers else 1.0
        s *= 1.0 if p.ranks == 2 else 0.6
        return s

    def __call__(self, p: Point, prune_below: float | None) -> Result:
        self.calls.append((p, prune_below))
        if p.micro >= self.oom_from:
            self.clock.t += 2.0
            return Result(OOM, wall_s=2.0, message="CUDA out of memory")
        s = self.speed(p)
        if prune_below is not None and s < prune_below:  # stopped after its first timed steps: cheaper
            self.clock.t += self.cost_s / 3
            return Result(PRUNED, s, [1.0, 1.0], self.cost_s / 3)
        self.clock.t += self.cost_s
        return Result(OK, s, [128 / s] * 5, self.cost_s)


def run_search(measure, clock, *, budget_s=10_000.0, cache=None, space=SPACE, start=START, **kw):
    return tune.search(start, space, measure, budget=Budget(budget_s, clock), cache=cache, **kw)


def test_finds_the_optimum_of_a_fake_measure():
    clock = FakeClock()
    out = run_search(FakeMeasure(clock), clock)
    assert out.best == dataclasses.replace(START, micro=32, accum=2, zero=1, channels_last=True)
    assert out.speedup == pytest.approx(1.3 * 1.1 / 0.9, rel=1e-6)
    assert not out.default_is_best
    assert out.confirm_rounds, "the finalists are re-measured side by side"


def test_global_batch_stays_unless_allowed():
    clock = FakeClock()
    out = run_search(FakeMeasure(clock), clock)
    for p, _ in out.measured:
        assert p.micro * p.accum * p.ranks == 128 == p.global_batch
    allowed = dataclasses.replace(SPACE, global_batch=[128, 256])
    out = run_search(FakeMeasure(FakeClock()), FakeClock(), space=allowed)
    assert {p.global_batch for p, _ in out.measured} == {128, 256}
    for p, _ in out.measured:
        assert p.micro * p.accum * p.ranks == p.global_batch


def test_budget_is_respected_on_a_fake_clock():
    clock = FakeClock()
    measure = FakeMeasure(clock, cost_s=10.0)
    out = run_search(measure, clock, budget_s=45.0)
    assert out.stopped_by_budget
    assert clock.t <= 45.0 + 10.0  # no measurement starts that the estimate says would not fit
    assert 3 <= len(measure.calls) <= 5
    full = FakeMeasure(FakeClock())
    assert len(full.calls) == 0 and len(run_search(full, full.clock).measured) > len(measure.calls)


def test_slow_points_are_pruned_early():
    clock = FakeClock()
    measure = FakeMeasure(clock)
    out = run_search(measure, clock)
    pruned = [(p, r) for p, r in out.measured if r.status == PRUNED]
    assert pruned, "a point slower than the best by the margin is stopped after its first steps"
    for p, r in pruned:
        floor = next(f for q, f in measure.calls if q == p)
        assert floor is not None and r.samples_per_s < floor
        assert measure.speed(p) < out.best_sps
    assert any(p.zero == 3 for p, _ in pruned)  # ZeRO-3 at 0.7x the best


def test_an_out_of_memory_point_is_pruned_and_larger_ones_are_not_measured():
    clock = FakeClock()
    measure = FakeMeasure(clock, oom_from=32)
    space = dataclasses.replace(SPACE, micro=[8, 16, 32, 64, 128])
    start = dataclasses.replace(START, micro=8, accum=8)
    out = run_search(measure, clock, space=space, start=start)
    statuses = {p.micro: r.status for p, r in out.measured if p.zero == 0 and p.layout == (2, 1)
                and not p.channels_last and not p.workers}
    assert statuses[32] == OOM
    assert all(p.micro < 64 for p, _ in measure.calls), "nothing above the first OOM is launched"
    assert out.best.micro == 16
    assert out.best_sps is not None


def test_resumes_from_the_cache_without_measuring_again(tmp_path):
    cache: dict[str, dict] = {}
    clock = FakeClock()
    first = FakeMeasure(clock, cost_s=10.0)
    interrupted = run_search(first, clock, budget_s=60.0, cache=cache)
    assert interrupted.stopped_by_budget and cache
    stored = json.loads(json.dumps(cache))  # what the sidecar holds survives JSON
    n_stored = len(stored)
    assert n_stored == len(first.calls)
    clock2 = FakeClock()
    second = FakeMeasure(clock2)
    resumed = run_search(second, clock2, cache=stored)
    fresh = FakeMeasure(FakeClock())
    assert resumed.best == run_search(fresh, fresh.clock).best
    # the resumed search takes the same path as a fresh one, measuring only what the cache lacks
    assert len(second.calls) == len(fresh.calls) - n_stored
    assert len(stored) == len(fresh.calls)  # and the cache now holds every point


def test_invalid_points_are_never_measured():
    clock = FakeClock()
    measure = FakeMeasure(clock)
    out = run_search(measure, clock, validate=lambda p: "ZeRO 2 refused" if p.zero == 2 else None)
    assert all(p.zero != 2 for p, _ in measure.calls)
    assert any(r.status == "invalid" and p.zero == 2 for p, r in out.measured)


def test_the_default_is_best_when_nothing_beats_it():
    clock = FakeClock()
    flat = FakeMeasure(clock)
    flat.speed = lambda p: 500.0 if p == START else 490.0
    out = run_search(flat, clock)
    assert out.default_is_best and out.best == START


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("micro", [16, 64])
def test_every_point_json_passes_the_ds_json_validation(stage, micro):
    p = dataclasses.replace(START, micro=micro, accum=128 // (micro * 2), zero=stage)
    d = point_ds_json(BASE, START, p, optimizer_family="adamw")
    s = ds_config.prepare("point", 2, data=d)
    assert (s.micro_batch, s.grad_accum, s.global_batch, s.zero_stage) == (micro, 128 // (micro * 2), 128, stage)


def test_numerics_and_batch_changes_in_the_json():
    bf16 = point_ds_json(BASE, START, dataclasses.replace(START, precision="bf16"), optimizer_family="adamw")
    assert ds_config.prepare("p", 2, data=bf16).precision == "bf16"
    onebit = point_ds_json(BASE, START, dataclasses.replace(START, comm="OneBitAdam"), optimizer_family="adamw")
    assert ds_config.prepare("p", 2, data=onebit).compresses and onebit["optimizer"]["params"]["lr"] == 0.002
    dat8 = point_ds_json(BASE, START, dataclasses.replace(START, comm="dat8"), optimizer_family="adamw")
    assert ds_config.prepare("p", 2, data=dat8).gradient_compression["bits"] == 8
    with pytest.raises(ConfigError):  # 1-bit with ZeRO 1: the validation refuses, so the search skips it
        ds_config.prepare("p", 2, data=point_ds_json(BASE, START, dataclasses.replace(START, comm="OneBitAdam", zero=1),
                                                     optimizer_family="adamw"))
    big = point_ds_json(BASE, START, dataclasses.replace(START, global_batch=256, accum=2), optimizer_family="adamw")
    assert big["optimizer"]["params"]["lr"] == pytest.approx(0.004)  # lr_scaling none: linear in the JSON
    kept = point_ds_json(BASE, START, dataclasses.replace(START, global_batch=256, accum=2), optimizer_family="adamw",
                         lr_rule="linear")
    assert kept["optimizer"]["params"]["lr"] == 0.002  # the runtime rescales it from base_batch_size
    assert "linear" in tune.lr_note(START, dataclasses.replace(START, global_batch=256), "linear", 256, 0.002)


def test_budget_parsing():
    assert [tune.parse_budget(b) for b in ("10m", "90s", "1.5h", "30")] == [600, 90, 5400, 30]
    for bad in ("10x", "-1m", "0", "m"):
        with pytest.raises(ConfigError):
            tune.parse_budget(bad)


def test_the_search_module_is_torch_free():
    code = "import sys, dat_ds.tune.search, dat_ds.tune.run, dat_ds.cli.tune; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def _cli(tmp_path: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DAT_DS_THREADS_PER_RANK": "1"}
    return subprocess.run([sys.executable, "-m", "dat_ds.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # ~150 s on the 2-core machine: two launches of the ranks
def test_real_tiny_tune_writes_a_json_that_validates_and_resumes(tmp_path):
    """One launch on 1 rank, PGD-1 on the embedded data: the JSON, the sidecar and the plot, then a resume."""
    out = tmp_path / "tuned" / "demo.json"
    argv = ["tune", "--recipe", "demo", "--nproc", "1", "--budget", "100s", "--set", "attack.steps=1",
            "--out", str(out)]
    proc = _cli(tmp_path, *argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tuned = json.loads(out.read_text())
    s = ds_config.prepare(str(out), 1, data=tuned)
    assert s.global_batch == 64  # the demo JSON's global batch on one rank, unchanged
    side = json.loads(out.with_name("demo.tuning.json").read_text())
    ok = [p for p in side["points"] if p["status"] == "ok"]
    assert ok and all(p["samples_per_s"] > 0 and len(p["step_s"]) >= 1 for p in ok)
    assert side["hardware"]["device"] and side["hardware"]["torch"] and side["command"][:2] == ["dat-ds", "tune"]
    assert side["summary"]["expected_speedup"] > 0 and out.with_suffix(".png").is_file()
    assert "samples/s" in proc.stdout
    # the same command again: every point already measured comes from the cache
    again = _cli(tmp_path, *argv[:-6], "--budget", "40s", *argv[-4:])
    assert again.returncode == 0, again.stderr[-3000:]
    side2 = json.loads(out.with_name("demo.tuning.json").read_text())
    cached = [p for p in side2["points"] if p["cached"]]
    assert len(cached) >= len(ok)


def test_a_tuned_json_is_accepted_by_train_unchanged(tmp_path):
    """What tune writes is a plain DeepSpeed JSON: `dat-ds train --dry-run` validates it at its world size."""
    best = dataclasses.replace(START, micro=16, accum=4, zero=1)
    path = tmp_path / "demo-2xcpu.json"
    path.write_text(json.dumps(point_ds_json(BASE, START, best, optimizer_family="adamw")))
    proc = _cli(tmp_path, "train", "--recipe", "demo", "--nproc", "2", "--deepspeed_config", str(path), "--dry-run",
                timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"global_batch": 128, "micro_batch_per_rank": 16, "grad_accum": 4, "zero_stage": 1' in proc.stderr
