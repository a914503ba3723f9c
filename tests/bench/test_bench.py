"""Benchmark plumbing on tiny sizes: the JSON they write and that the compared arms do the same work.

Speed itself is never asserted here (machines are noisy); `dat-ds bench ...` measures it.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from benchmarks import step
from benchmarks.common import count_passes, interleaved_timing, runs_folder
from benchmarks.engine import launch_worker
from dat_ds.core.errors import ConfigError
from tests.helpers import REPO


def test_step_arms_do_the_same_passes():
    spec = step.case_spec("small_cnn-28x28x1")
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
    spec = step.case_spec("small_cnn-28x28x1")
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


@pytest.mark.slow  # ~1 min: two 2-rank bench workers
def test_engine_and_ddp_workers_do_the_same_work():
    kw = dict(steps=2, micro=8, model="tiny_cnn", attack_steps=1)
    ds = launch_worker("deepspeed", 1, **kw)
    ddp = launch_worker("ddp", 1, **kw)
    for r in (ds, ddp):
        assert r["timed_steps"] == 2 and r["samples_per_s"] > 0
    # 5 steps (3 warm-up + 2 timed) x (1 attack pass + adversarial pass + clean pass)
    assert ds["forward_passes_rank0"] == ddp["forward_passes_rank0"] == 15
    assert ds["backward_passes_rank0"] == ddp["backward_passes_rank0"]


# ----------------------------------------------------------------------------- one house: registry, launcher, layers


def test_every_bench_resolves_and_no_bench_module_imports_torch():
    """``dat-ds bench --help`` / ``bench <name> --help`` stay torch-free: every bench module imports without it."""
    import subprocess
    import sys

    from benchmarks import get_bench
    from dat_ds.cli.bench import BENCH_HELP

    assert {"step", "engine", "scaling", "time-to-robust", "comm", "eval", "startup", "gpu-smoke"} <= set(BENCH_HELP)
    for name in BENCH_HELP:
        b = get_bench(name)
        assert callable(b.add_args) and callable(b.run) and b.help == BENCH_HELP[name]
    code = ("import sys, argparse\n"
            "from benchmarks import get_bench\n"
            "from dat_ds.cli import bench as cli_bench\n"
            "from dat_ds.cli.bench import BENCH_HELP\n"
            "for name in BENCH_HELP:\n"
            "    get_bench(name).add_args(argparse.ArgumentParser())\n"
            "p = argparse.ArgumentParser(); cli_bench._bench_args(p)\n"
            "a = p.parse_args(['startup', '--rounds', '2'])\n"
            "assert a.bench == 'startup' and a.rounds == 2 and a.out == 'bench', a\n"
            "import benchmarks.worker, benchmarks.comm, benchmarks.network\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"torch imported: {proc.stdout[:300]}"


def test_unknown_bench_is_a_config_error():
    from benchmarks import get_bench

    with pytest.raises(ConfigError, match="unknown benchmark 'nope'.*startup"):
        get_bench("nope")


def test_only_the_launcher_starts_ranks():
    """One launcher: no module but launch/launcher.py builds a DeepSpeed command line or spawns ranks, in the
    package or in the benchmarks beside it."""
    root = REPO
    # startup times the `dat-ds` command itself; unlabeled_memory measures one fresh single process's
    # memory per pool size (no rank, no process group), which a launched rank would blur with its own; plan
    # profiles one single-rank process per case from its first allocation
    allowed = {"dat_ds/launch/launcher.py", "benchmarks/startup.py", "benchmarks/unlabeled_memory.py",
               "benchmarks/plan.py"}
    offenders = []
    for path in [*(root / "dat_ds").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]:
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        for needle in ("deepspeed.launcher", "torch.multiprocessing", "mp.spawn", '"-m", "dat_ds',
                       '"-m", "benchmarks'):
            if needle in text and rel not in allowed:
                offenders.append(f"{rel}: {needle}")
    assert not offenders, offenders


def test_gpu_smoke_refuses_without_cuda_in_one_line(tmp_path):
    from benchmarks import get_bench
    from dat_ds.core import dist
    from dat_ds.core.errors import ConfigError

    if dist.accelerator().device_name() == "cuda":
        pytest.skip("a CUDA device is present: gpu-smoke runs instead of refusing")
    p = argparse.ArgumentParser()
    bench = get_bench("gpu-smoke")
    bench.add_args(p)
    args = p.parse_args(["--out", str(tmp_path / "out")])
    with pytest.raises(ConfigError) as e:
        bench.run(args)
    assert "needs a CUDA device" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_gpu_smoke_refusal_exits_2_with_one_error_line():
    import subprocess
    import sys

    code = ("import sys\n"
            "from benchmarks import get_bench\n"
            "from dat_ds.launch.entry import run_entry\n"
            "import argparse\n"
            "p = argparse.ArgumentParser(); b = get_bench('gpu-smoke'); b.add_args(p)\n"
            "sys.exit(run_entry(lambda: b.run(p.parse_args([]))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "needs a CUDA device" in errors[0] and "Traceback" not in proc.stderr


def test_startup_time_command_keeps_exit_code_and_last_line():
    import sys

    from benchmarks import startup

    r = startup.time_command([sys.executable, "-c", "import sys; sys.stderr.write('error: bad eps\\n'); sys.exit(2)"], 60)
    assert r["exit_code"] == 2 and r["last_line"] == "error: bad eps" and r["seconds"] > 0
    cmds = startup.quick_commands("runs/x")
    assert cmds["--help"][1] == 0 and cmds["config error"][1] == 2 and cmds["eval error"][1] == 2
    assert cmds["eval error"][0][1:] == ["-m", "dat_ds.cli", "eval", "--run", "runs/x", "--attacks", "bogus",
                                         "--nproc", "2"]


def test_synthetic_worker_data_is_seeded_and_shaped():
    from benchmarks.worker import synthetic_data

    (a, spec), (b, _) = synthetic_data("3x32", 8), synthetic_data("3x32", 8)
    assert (spec.in_chans, spec.img_size, spec.num_classes) == (3, 32, 10) and len(a) == 8
    assert torch.equal(a.tensors[0], b.tensors[0]) and a.tensors[0].shape == (8, 3, 32, 32)


def run_bench(name: str, argv: list[str]) -> None:
    """``dat-ds bench NAME ARGV`` in this process, through the same lookup and parser the CLI uses."""
    from benchmarks import get_bench

    p = argparse.ArgumentParser()
    bench = get_bench(name)
    bench.add_args(p)
    bench.run(p.parse_args(argv))


@pytest.mark.slow
def test_bench_comm_runs_on_the_accelerator_through_launch(tmp_path):
    run_bench("comm", ["--out", str(tmp_path), "--steps", "2", "--warmup", "1"])
    data = json.loads((tmp_path / "comm.json").read_text())
    assert data["nproc"] == 2 and data["threads_per_rank"] == 1
    assert set(data["arms"]) == {"fp32 all-reduce", "DAT 8-bit", "1-bit Adam", "0/1 Adam", "1-bit LAMB"}
    assert all(a["measured_steps"] == 2 and a["bytes_per_step"] > 0 for a in data["arms"].values())


@pytest.mark.slow
def test_bench_startup_writes_ratios(tmp_path):
    run_bench("startup", ["--out", str(tmp_path), "--rounds", "1", "--demo-rounds", "0"])
    data = json.loads((tmp_path / "startup.json").read_text())
    assert data["import_torch"]["median_s"] > 0 and data["demo_first_step"] is None
    for name in ("--help", "config error", "eval error"):
        r = data["commands"][name]
        assert r["ratio_to_import_torch"] > 0 and r["rounds"] == 1
    assert data["commands"]["--help"]["exit_code"] == 0 and data["commands"]["config error"]["exit_code"] == 2


def test_runs_folder_keeps_runs_dir_and_removes_its_temporary_folder_even_on_failure(tmp_path):
    with pytest.raises(ConfigError, match="--reuse needs --runs-dir"):
        with runs_folder(None, True, "dat-ds-test-"):
            pass
    with runs_folder(str(tmp_path / "kept"), True, "dat-ds-test-") as runs:
        runs.mkdir()
    assert runs.is_dir()
    with pytest.raises(KeyboardInterrupt):
        with runs_folder(None, False, "dat-ds-test-") as tmp:
            (tmp / "run").mkdir()
            raise KeyboardInterrupt
    assert tmp.name.startswith("dat-ds-test-") and not tmp.exists()
