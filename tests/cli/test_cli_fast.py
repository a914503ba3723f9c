"""The command line answers without torch: ``--help``, ``list``, ``--dry-run`` and every one-line input
error run in a fresh interpreter where importing torch (or deepspeed, timm, numpy, ...) fails and
starting a process fails, so each case also proves that no rank was started.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dat_ds.core import names
from tests.helpers import GUARD, REPO, fast_cli, write_committed_tag

EVAL_CHOICES = ", ".join(n for n in names.ATTACKS if n != "none")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["demo", "--help"],
                                  ["pretrain", "--help"], ["finetune", "--help"], ["pseudo-label", "--help"],
                                  ["export", "--help"], ["bench", "--help"], ["bench", "step", "--help"],
                                  ["bench", "engine", "--help"], ["tune", "--help"], ["plan", "--help"], ["verify", "--help"]],
                         ids=" ".join)
def test_help_imports_no_torch(tmp_path, argv):
    proc = fast_cli(tmp_path, *argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: dat-ds"), proc.stdout[:200]


def test_list_answers_from_the_static_names(tmp_path):
    proc = fast_cli(tmp_path, "list")
    assert proc.returncode == 0, proc.stderr
    for name in (*names.ATTACKS, *names.OBJECTIVES, *names.DATASETS, *names.OPTIMIZERS):
        assert name in proc.stdout


@pytest.mark.parametrize("argv,expected", [
    (["train", "--recipe", "demo", "--nproc", "2", "--dry-run"], '"world_size": 2, "global_batch": 128'),
    (["train", "--recipe", "demo", "--num_gpus", "2", "--dry-run"], '"world_size": 2, "global_batch": 128'),  # deepspeed's word
    (["train", "--recipe", "recipes/demo.yaml", "--deepspeed_config", "zero2_fp32", "--dry-run"], '"zero_stage": 2'),
    (["-v", "train", "--recipe", "demo", "--deepspeed_config", "ds_configs/zero1_fp32.json", "--dry-run", "-v"],
     '"zero_stage": 1'),
    (["pretrain", "--recipe", "acl_pretrain_embedded", "--dry-run"], '"world_size": 1'),
], ids=["by-name", "num-gpus", "ds-config-by-name", "verbose-and-doc-paths", "pretrain"])
def test_dry_run_of_shipped_files_from_any_folder(tmp_path, argv, expected):
    """Recipes and DeepSpeed JSONs ship in the package: found by name, or by their documented path, anywhere."""
    proc = fast_cli(tmp_path, *argv)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stderr


def _ds(tmp_path: Path, **changes) -> str:
    cfg = {"train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, **changes}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _names(kind: str) -> str:
    return ", ".join(names.STATIC[kind])


# (id, argv builder, the one error line). Every command that starts ranks gets --nproc 2.
CASES = [
    ("config-typo", lambda t: ["train", "--set", "attack.epz=0.1", "--nproc", "2"],
     "unknown config key 'attack.epz' in section 'attack'; allowed: eps, eps_warmup_epochs, name, noise_multiplier, norm, restarts, reuse, reuse_max_bytes, step_size, steps, steps_schedule, zero3_gather, zero3_gather_budget_gb"),
    ("eval-bogus-attack", lambda t: ["eval", "--run", "runs/demo", "--attacks", "bogus", "--nproc", "2"],
     f"unknown attack 'bogus'; choose one of: {EVAL_CHOICES}"),
    ("eval-bogus-second-attack", lambda t: ["eval", "--run", "runs/demo", "--attacks", "pgd,autoattak", "--nproc", "2"],
     f"unknown attack 'autoattak'; choose one of: {EVAL_CHOICES}"),
    ("eval-missing-run", lambda t: ["eval", "--run", "runs/nothing", "--nproc", "2"],
     "--run 'runs/nothing' does not exist; give a run folder such as runs/demo"),
    ("eval-bogus-data", lambda t: ["eval", "--weights", "w.pt", "--model", "small_cnn", "--data", "mnistt"],
     f"unknown data set 'mnistt'; choose one of: {_names('data set')}"),
    ("train-bogus-attack", lambda t: ["train", "--set", "attack.name=bogus", "--nproc", "2"],
     f"unknown attack 'bogus'; choose one of: {_names('attack')}"),
    ("train-bogus-eval-attack", lambda t: ["train", "--set", "eval.attack=bogus", "--nproc", "2"],
     f"unknown attack 'bogus'; choose one of: {_names('attack')}"),
    ("train-bogus-objective", lambda t: ["train", "--set", "objective.name=bogus", "--nproc", "2"],
     f"unknown objective 'bogus'; choose one of: {_names('objective')}"),
    ("train-bogus-data", lambda t: ["train", "--set", "data.name=bogus", "--nproc", "2"],
     f"unknown data set 'bogus'; choose one of: {_names('data set')}"),
    ("train-bogus-optimizer", lambda t: ["train", "--ds-config", _ds(t, optimizer={"type": "Adamm"}), "--nproc", "2"],
     f"unknown optimizer type 'Adamm' in the DeepSpeed config; choose one of: {_names('optimizer')} (case-insensitive)"),
    ("train-batch-for-world", lambda t: ["train", "--recipe", "cifar10_prn18_dat_pgd", "--nproc", "3"],
     "train_batch_size=2048 is not divisible by gradient_accumulation_steps=1 x world_size=3; change train_batch_size or "
     "give train_micro_batch_size_per_gpu"),
    ("train-compression-bits", lambda t: ["train", "--nproc", "2", "--ds-config",
                                          _ds(t, gradient_compression={"type": "dat_quantizer", "bits": 3})],
     "dat_quantizer bits=3 is not supported; use 2, 4 or 8"),
    ("train-missing-recipe", lambda t: ["train", "--recipe", "nope", "--nproc", "2"],
     "recipe file 'nope' not found; pass an existing YAML file (see recipes/)"),
    ("demo-bogus-attack", lambda t: ["demo", "--set", "attack.name=bogus"],
     f"unknown attack 'bogus'; choose one of: {_names('attack')}"),
    ("pretrain-bogus-objective", lambda t: ["pretrain", "--recipe", "acl_pretrain_embedded", "--set",
                                            "objective.name=bogus", "--nproc", "2"],
     f"unknown objective 'bogus'; choose one of: {_names('objective')}"),
    ("pretrain-supervised-objective", lambda t: ["pretrain", "--recipe", "demo", "--nproc", "2"],
     "dat-ds pretrain needs a self-supervised objective (acl, fare), the config has 'dat'; set objective.name=acl (or "
     "fare) or use `dat-ds train`"),
    ("finetune-bogus-attack", lambda t: ["finetune", "--mode", "alf", "--random-init", "--recipe", "acl_pretrain_embedded",
                                         "--set", "attack.name=bogus", "--out", "r.json"],
     f"unknown attack 'bogus'; choose one of: {_names('attack')}"),
    ("finetune-missing-encoder", lambda t: ["finetune", "--mode", "slf", "--encoder", "runs/none"],
     "--encoder 'runs/none' is not a folder; give a `dat-ds pretrain` run folder"),
    ("pseudo-label-bogus-data", lambda t: ["pseudo-label", "--weights", "w.pt", "--model", "small_cnn", "--data", "bogus",
                                           "--pool", "embedded:train[1000:]", "--out", "p.npz"],
     f"unknown data set 'bogus'; choose one of: {_names('data set')}"),
    ("pseudo-label-missing-run", lambda t: ["pseudo-label", "--run", "runs/none", "--out", "p.npz"],
     "--run 'runs/none' does not exist; give a run folder such as runs/demo"),
    ("pseudo-label-bogus-pool", lambda t: ["pseudo-label", "--run", str(t), "--pool", "bogus:train[1:]", "--out", "p.npz"],
     "unknown pool source 'bogus' in 'bogus:train[1:]'; use embedded:, fashion-mnist-full: or a .npz file"),
    ("pseudo-label-missing-pool", lambda t: ["pseudo-label", "--run", str(t), "--pool", "nope.npz", "--out", "p.npz"],
     "pool 'nope.npz' is neither an existing file nor a spec like embedded:train[1000:]"),
    ("export-missing-run", lambda t: ["export", "--run", "runs/none", "--out", "m.safetensors"],
     "--run 'runs/none' does not exist; give a run folder such as runs/demo"),
    ("nproc-zero", lambda t: ["eval", "--run", "runs/demo", "--nproc", "0"], "--nproc=0 must be >= 1"),
    ("tune-bad-budget", lambda t: ["tune", "--recipe", "demo", "--nproc", "2", "--budget", "10x"],
     "--budget '10x' is not a duration; write e.g. 10m, 90s or 1h"),
    ("tune-batch-for-world", lambda t: ["tune", "--recipe", "cifar10_prn18_dat_pgd", "--nproc", "3"],
     "train_batch_size=2048 is not divisible by gradient_accumulation_steps=1 x world_size=3; change train_batch_size or "
     "give train_micro_batch_size_per_gpu"),
    ("tune-bogus-attack", lambda t: ["tune", "--recipe", "demo", "--nproc", "2", "--set", "attack.name=bogus"],
     f"unknown attack 'bogus'; choose one of: {_names('attack')}"),
    ("tune-out-not-json", lambda t: ["tune", "--recipe", "demo", "--nproc", "2", "--out", "tuned.yaml"],
     "--out 'tuned.yaml' must end in .json"),
    ("plan-bad-memory", lambda t: ["plan", "--recipe", "demo", "--gpu-memory", "80XB"],
     "--gpu-memory '80XB' has an unknown unit; use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB"),
    ("plan-memory-not-a-size", lambda t: ["plan", "--recipe", "demo", "--gpu-memory", "lots"],
     "--gpu-memory 'lots' must be a size such as 80GB or 80GiB"),
    ("plan-zero-gpus", lambda t: ["plan", "--recipe", "demo", "--gpus", "0"], "--gpus=0 must be >= 1"),
    ("plan-micro-not-dividing", lambda t: ["plan", "--recipe", "demo", "--gpus", "2", "--micro-batches", "3"],
     "--micro-batches: 3 x 2 GPUs does not divide the global batch 128 into whole accumulation steps"),
    ("plan-batch-for-world", lambda t: ["plan", "--recipe", "cifar10_prn18_dat_pgd", "--gpus", "3"],
     "train_batch_size=2048 is not divisible by gradient_accumulation_steps=1 x world_size=3; change train_batch_size or "
     "give train_micro_batch_size_per_gpu"),
    ("bench-vs-without-a", lambda t: ["bench", "engine", "--vs", "zero0_fp32"],
     "bench engine compares two JSONs with both --deepspeed_config A and --vs B"),
    ("verify-missing-run", lambda t: ["verify", "runs/none"],
     "'runs/none' does not exist; give a run folder such as runs/demo, its checkpoint/ folder or one checkpoint "
     "folder in it"),
]


@pytest.mark.parametrize("case_id,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_input_error_is_one_line_without_torch_or_ranks(tmp_path, case_id, argv, expected):
    proc = fast_cli(tmp_path, *argv(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: " + expected], proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()  # nothing written


def test_verify_checks_a_run_without_torch(tmp_path):
    """``dat-ds verify``: one line per committed checkpoint, exit 0 when all are intact, 1 when one is damaged
    (here a flipped byte: same size, another SHA-256); hashlib only, no torch."""
    root = tmp_path / "runs" / "r" / "checkpoint"
    old = write_committed_tag(root, {"model.pt": b"w" * 3000, "rank_state_0.pt": b"r" * 10}, global_step=4,
                              tag="step000000004")
    new = write_committed_tag(root, {"model.pt": b"v" * 3000}, global_step=8, tag="step000000008")
    (root / ".tmp-step000000012").mkdir()  # an unfinished save is not a checkpoint: not listed
    proc = fast_cli(tmp_path, "verify", "runs/r")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == ["runs/r/checkpoint/step000000004: ok (2 files, sha256)",
                                        "runs/r/checkpoint/step000000008: ok (1 files, sha256)"]
    (new / "model.pt").write_bytes(b"v" * 1500 + b"w" + b"v" * 1499)
    proc = fast_cli(tmp_path, "verify", "runs/r")
    recorded, actual = (hashlib.sha256(b).hexdigest()[:16] for b in (b"v" * 3000, b"v" * 1500 + b"w" + b"v" * 1499))
    assert (proc.returncode, proc.stderr) == (1, "")
    assert proc.stdout.splitlines() == [
        "runs/r/checkpoint/step000000004: ok (2 files, sha256)",
        f"runs/r/checkpoint/step000000008: damaged: model.pt has sha256 {actual}..., complete.json recorded {recorded}..."]
    proc = fast_cli(tmp_path, "verify", str(old))  # one checkpoint folder
    assert (proc.returncode, proc.stdout) == (0, f"{old}: ok (2 files, sha256)\n")


# ----------------------------------------------------------------------------- the benchmarks are not in the wheel

NOT_IN_WHEEL = ("error: dat-ds bench runs from a checkout of the repository: the benchmarks live in its benchmarks/ "
                "folder, outside the wheel (git clone ...; uv run dat-ds bench step)")


def wheel_python(tmp_path: Path, code: str, *argv: str) -> subprocess.CompletedProcess:
    """``python -c CODE ARGV`` as after a wheel install: ``dat_ds`` importable, the checkout (and its
    ``benchmarks``) not on the path."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    if not (site / "dat_ds").exists():
        (site / "dat_ds").symlink_to(REPO / "dat_ds", target_is_directory=True)
    unpath = (f"import os, sys\nsys.path[:] = [{str(site)!r}] + [p for p in sys.path "
              f"if os.path.realpath(p or '.') != {str(REPO.resolve())!r}]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DAT_DS_VERBOSE")}
    return subprocess.run([sys.executable, "-c", unpath + code, *argv], cwd=site, env=env, capture_output=True,
                          text=True, timeout=60)


def wheel_cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """``dat-ds ARGV`` from the wheel, heavy imports and process starts forbidden as in ``fast_cli``."""
    return wheel_python(tmp_path, GUARD, *argv)


@pytest.mark.parametrize("argv", [["bench", "step"], ["bench", "step", "--help"], ["bench", "engine", "--steps", "3"]],
                         ids=" ".join)
def test_bench_without_a_checkout_is_one_line_and_exit_2(tmp_path, argv):
    proc = wheel_cli(tmp_path, *argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [NOT_IN_WHEEL] and proc.stdout == ""


def test_without_a_checkout_the_rest_of_the_cli_is_whole(tmp_path):
    """The wheel's ``dat-ds`` still lists the benchmarks and runs every other command's fast path."""
    where = wheel_python(tmp_path, "import dat_ds, importlib.util as u; print(dat_ds.__file__, u.find_spec('benchmarks'))")
    assert where.returncode == 0 and where.stdout.split()[-1] == "None", where.stdout + where.stderr
    listing = wheel_cli(tmp_path, "bench", "--help")
    assert listing.returncode == 0 and "time-to-robust" in listing.stdout, listing.stderr
    assert wheel_cli(tmp_path, "tune", "--help").returncode == 0
    dry = wheel_cli(tmp_path, "train", "--recipe", "demo", "--dry-run")
    assert dry.returncode == 0 and '"world_size": 1' in dry.stderr, dry.stderr[-2000:]


def test_the_wheel_ships_the_package_only():
    """hatch builds the wheel from ``dat_ds`` alone (``uv build`` is slow: its config is read instead); the
    harnesses are beside it and nothing in it imports them but the CLI's lazy ``bench`` dispatch
    (``tests/test_layers.py`` checks every import)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    wheel = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["dat_ds"] and not wheel.get("include") and not wheel.get("force-include")
    assert (REPO / "benchmarks" / "__init__.py").is_file() and not (REPO / "dat_ds" / "bench").exists()
    assert [p for p in (REPO / "dat_ds").rglob("*.py") if "import benchmarks" in p.read_text()] == \
        [REPO / "dat_ds" / "cli" / "bench.py"]


def test_every_listed_benchmark_has_its_harness():
    """``dat-ds bench NAME`` is ``benchmarks/<NAME with - as _>.py``: the CLI's static list and the folder agree."""
    from dat_ds.cli.bench import BENCH_HELP

    harnesses = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - {"__init__"}
    assert {n.replace("-", "_") for n in BENCH_HELP} <= harnesses


def test_launch_flags_and_their_aliases_stay_with_the_launching_command():
    from dat_ds.launch.launcher import strip_launch_args

    argv = ["--num_gpus", "2", "--set", "a=b", "--num-gpus=3", "--nproc", "1", "--hostfile=h", "--master-port", "9"]
    assert strip_launch_args(argv) == ["--set", "a=b"]
