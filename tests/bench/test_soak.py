"""``dat-ds bench soak``: the trend test can fail, the /proc sampler finds the ranks, the disk bound is checked."""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

from benchmarks import soak

HOUR = 3600.0


def series(fn, n: int = 600, dt: float = 1.0, seed: int = 0) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    t = [i * dt for i in range(n)]
    return t, [fn(x, rng) for x in t]


def verdict(t, y, min_change: float = 0.0) -> str:
    return soak.trend(t, y, start=t[0], end=t[-1], min_change=min_change)["verdict"]


def test_a_steady_leak_grows():
    # 300 MB plus 20 KB a second (12 MB over 10 min) under 2 MB of noise
    t, y = series(lambda x, r: 300e6 + 20e3 * x + r.gauss(0, 2e6))
    out = soak.trend(t, y, start=0, end=t[-1], min_change=0.01 * 300e6)
    assert out["verdict"] == "grows", out
    assert out["slope_ci95_per_s"][0] > 0 and out["thirds_change"] > out["threshold"]
    assert 15e3 < out["slope_per_s"] < 25e3


def test_a_leak_of_one_descriptor_every_minute_grows():
    t, y = series(lambda x, r: 60 + x // 60)
    assert verdict(t, y, min_change=1) == "grows"


def test_a_step_up_halfway_grows():
    t, y = series(lambda x, r: 100 + (10 if x > 300 else 0) + r.gauss(0, 1))
    assert verdict(t, y) == "grows"


def test_flat_noise_is_flat_over_seeds():
    for seed in range(20):
        t, y = series(lambda x, r: 300e6 + r.gauss(0, 5e6), seed=seed)
        assert verdict(t, y, min_change=3e6) == "flat", seed


def test_autocorrelated_noise_is_flat():
    """A slow random wander (each sample near the last) is not a trend: the interval is widened for it."""
    for seed in range(10):
        rng, level, y = random.Random(seed), 0.0, []
        for _ in range(600):
            level = 0.95 * level + rng.gauss(0, 1)
            y.append(50 + level)
        assert verdict([float(i) for i in range(600)], y, min_change=1.0) == "flat", seed


def test_a_sawtooth_like_checkpoint_rotation_is_flat():
    # disk use: 3 checkpoints of 2 MB, a fourth while a save is written, every 7 s
    t, y = series(lambda x, r: 6e6 + (2e6 if x % 7 < 2 else 0))
    assert verdict(t, y, min_change=2e6) == "flat"


def test_growth_below_min_change_is_flat_and_few_samples_are_too_short():
    t, y = series(lambda x, r: 300e6 + 1e3 * x)  # 0.6 MB over the run: steady but under 1% of 300 MB
    assert verdict(t, y, min_change=3e6) == "flat"
    assert verdict(t[:8], y[:8]) == "too short"


def test_a_staircase_leak_grows_and_a_rise_that_stops_is_flat():
    # resident memory grows in 2 MB allocator chunks, 12 MB over the run: a leak, though each step is flat
    t, y = series(lambda x, r: 300e6 + (20e3 * x // 2e6) * 2e6)
    assert verdict(t, y, min_change=3e6) == "grows"
    # climbs 150 MB in the first quarter (arenas, caches), then stays: bounded, not a leak; the line fits it
    # badly, and that misfit counts as noise
    t, y = series(lambda x, r: 300e6 + min(x, 150) * 1e6 + r.gauss(0, 1e5))
    out = soak.trend(t, y, start=0, end=t[-1], min_change=3e6)
    assert out["verdict"] == "flat" and out["thirds_change"] < out["threshold"], out
    assert soak.trend(t, y, start=150, end=t[-1], min_change=3e6)["verdict"] == "flat"
    # still climbing at half time: grows
    t, y = series(lambda x, r: 300e6 + min(x, 300) * 1e6 + r.gauss(0, 1e5))
    assert verdict(t, y, min_change=3e6) == "grows"


# ----------------------------------------------------------------------------- the sampler


def test_rank_processes_are_told_from_launchers_and_loader_workers():
    rank_cmd = f"python -u -m {soak.RANK_MODULE} --name soak"
    table = {
        1: (0, "init"), 10: (1, "dat-ds bench soak"),
        11: (10, "python -m deepspeed.launcher.runner --module dat_ds.train"),
        12: (11, "python -m deepspeed.launcher.launch --module=dat_ds.train"),
        20: (12, rank_cmd), 21: (12, rank_cmd),
        30: (20, rank_cmd), 31: (21, rank_cmd),  # forked DataLoader workers keep their rank's command line
        40: (1, rank_cmd),  # another run's rank, not under this benchmark
        50: (10, f"python -m {soak.RANK_MODULE}x"),
    }
    assert soak.rank_processes(table, 10) == ([20, 21], [30, 31])
    assert soak.descendants(table, 12) == [20, 21, 30, 31]


def test_proc_readings_of_this_process_and_of_a_gone_one(tmp_path):
    rss, fds = soak.rss_and_fds(os.getpid())
    assert rss > 10 * 2**20 and fds >= 3
    assert os.getpid() in soak.proc_table()
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert soak.rss_and_fds(proc.pid) is None
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 100_000)
    assert 100_000 <= soak.disk_bytes(tmp_path) < 200_000
    assert soak.disk_bytes(tmp_path / "missing") == 0


def test_step_records_are_read_whole_lines_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sampler = soak.Sampler(run, global_batch=32, interval=1.0, t0=0.0)
    sampler._read_steps(1.0)  # no metrics.jsonl yet
    line = json.dumps({"kind": "step", "epoch": 1, "step": 1, "samples_per_s": 320.0}) + "\n"
    with open(run / "metrics.jsonl", "w") as f:
        f.write(line + json.dumps({"kind": "epoch", "epoch": 1}) + "\n" + line[:20])
    sampler._read_steps(2.0)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line[20:].replace('"step": 1', '"step": 2'))
    sampler._read_steps(3.0)
    s = sampler.samples
    assert s.step == [1, 2] and s.step_t == [2.0, 3.0] and s.step_seconds == [0.1, 0.1]


# ----------------------------------------------------------------------------- analysis and outputs


def made_up_samples(*, leak: float = 0.0, disk_extra: int = 0) -> soak.Samples:
    rng = random.Random(0)
    s = soak.Samples(rank_pids=[100, 101])
    for i in range(305):  # the second rank process ends first, 5 samples after the last step
        t, ended = float(i), i >= 300
        s.t.append(t)
        s.rss_ranks.append([int(400e6 + leak * t + rng.gauss(0, 1e6)), None if ended else int(380e6 + rng.gauss(0, 1e6))])
        s.fds_ranks.append([70, None if ended else 68])
        s.workers.append(2)
        s.rss_workers.append(int(300e6))
        s.fds_workers.append(40)
        s.disk_checkpoint.append(6_000_000 + (2_000_000 if i % 5 == 0 else 0) + (disk_extra if i > 200 else 0))
        s.disk_run.append(s.disk_checkpoint[-1] + 100_000 + 300 * i)
        s.checkpoints.append(4 if i % 5 == 0 else 3)
        s.load1.append(1.5)
        if 20 <= i < 300:
            s.step_t.append(t)
            s.step.append(i - 19)
            s.epoch.append((i - 19) // 16 + 1)
            s.step_seconds.append(0.05 + rng.gauss(0, 0.005))
    return s


def test_analyse_flat_samples_meet_the_goal_and_plot(tmp_path):
    s = made_up_samples()
    judged = soak.analyse(s, checkpoint_bytes=2_000_000, keep_last=3, warmup=0.1)
    assert {k: v["verdict"] for k, v in judged["series"].items()} == dict.fromkeys(soak.MIN_CHANGE, "flat")
    assert judged["warmup_ends_s"] == pytest.approx(20 + 0.1 * 279)
    bound = judged["disk_bound"]
    assert bound["bound_bytes"] == 4 * 2_000_000 + soak.SMALL_FILES_SLACK and bound["within"]
    assert bound["max_checkpoint_folder_bytes"] == 8_000_000 and bound["most_checkpoints_seen"] == 4
    summary = soak.summarize(s)
    assert summary["fds_ranks"] == {"start": 138, "end": 138, "max": 138} and summary["rank_processes_seen"] == 2
    assert len(summary["rss_per_rank_bytes"]) == 2
    result = {"samples": vars(s), "series": judged["series"], "warmup_ends_s": judged["warmup_ends_s"],
              "last_step_s": judged["last_step_s"], "disk_bound": bound, "epochs": 18, "steps": 280,
              "config": {"nproc": 2}, "cpus": 2}
    soak.plot(json.loads(json.dumps(result)), tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000


def test_analyse_finds_a_memory_leak_and_a_disk_over_the_bound():
    judged = soak.analyse(made_up_samples(leak=100e3, disk_extra=4_000_000), checkpoint_bytes=2_000_000,
                          keep_last=3, warmup=0.1)
    assert judged["series"]["rss"]["verdict"] == "grows"
    assert judged["series"]["disk"]["verdict"] == "grows" and not judged["disk_bound"]["within"]
    with pytest.raises(RuntimeError, match="no step record"):
        soak.analyse(soak.Samples(), checkpoint_bytes=1, keep_last=3, warmup=0.1)


def test_bad_arguments_are_one_line_config_errors(tmp_path):
    from dat_ds.core.errors import ConfigError
    from tests.bench.test_bench import run_bench

    with pytest.raises(ConfigError, match="not a multiple of --micro-batch x --nproc"):
        run_bench("soak", ["--out", str(tmp_path), "--subset", "100"])
    with pytest.raises(ConfigError, match="--warmup-share < 1"):
        run_bench("soak", ["--out", str(tmp_path), "--warmup-share", "1"])
    assert not (tmp_path / "soak.json").exists()


@pytest.mark.slow  # a real 2-rank run: start-up alone takes 20-90 s on 2 shared cores
def test_bench_soak_writes_json_and_plot(tmp_path):
    from tests.bench.test_bench import run_bench

    run_bench("soak", ["--out", str(tmp_path), "--epochs", "3", "--subset", "128", "--save-every", "2",
                       "--interval", "0.5", "--eval-every", "2"])
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["benchmark"] == "soak" and "machine" in data and data["rule"] == soak.RULE
    assert data["epochs"] == 3 and data["steps"] == 12 and data["steps_per_epoch"] == 4
    assert set(data["series"]) == set(soak.MIN_CHANGE) and data["disk_bound"]["within"]
    assert len(data["checkpoints_left"]) == 3 and data["disk_bound"]["checkpoint_bytes"] > 100_000
    assert len(data["samples"]["rank_pids"]) == data["summary"]["rank_processes_seen"] == 2
    assert max(data["samples"]["workers"]) >= 1 and len(data["samples"]["step_seconds"]) == 12
    assert "/tmp" not in json.dumps({k: v for k, v in data.items() if k != "machine"})
    assert (tmp_path / "soak.png").stat().st_size > 10_000
