"""The wheel is the product: built, installed into a fresh venv and run from an empty folder, the shipped
recipes, DeepSpeed JSONs and embedded data are found by name and the demo trains end to end; and pip,
installing it with its dependencies where a cluster's torch already is, keeps that torch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "DAT_DS_VERBOSE")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_from_an_empty_folder(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    dist = tmp_path / "dist"
    _run([uv, "build", "--wheel", "-o", str(dist)], cwd=REPO, timeout=300)
    (wheel,) = dist.glob("dat_ds-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for stem in ("demo", "cifar10_prn18_dat_pgd"):
        assert f"dat_ds/recipes/{stem}.yaml" in shipped
    for stem in ("zero0_fp32", "zero2_fp32", "dat_8bit"):
        assert f"dat_ds/ds_configs/{stem}.json" in shipped
    assert "dat_ds/data/embedded/fashion_mnist_subset.npz" in shipped

    # The locked versions (uv's cache makes this mostly links), then the wheel itself.
    reqs = tmp_path / "requirements.txt"
    _run([uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "-o", str(reqs)], cwd=REPO)
    venv = tmp_path / "venv"
    _run([uv, "venv", "-q", "--python", sys.executable, str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    _run([uv, "pip", "install", "-q", "--python", str(py), "-r", str(reqs), str(wheel)], cwd=tmp_path, timeout=1200)
    dat_ds = str(venv / "bin" / "dat-ds")

    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([str(py), "-c", "import dat_ds; print(dat_ds.__file__)"], cwd=empty).stdout
    assert str(venv) in where  # the installed copy, not the source checkout
    dry = _run([dat_ds, "train", "--recipe", "cifar10_prn18_dat_pgd", "--nproc", "8", "--set", "data.root=.", "--dry-run"],
               cwd=empty)
    assert '"world_size": 8, "global_batch": 2048' in dry.stderr
    dry = _run([dat_ds, "train", "--recipe", "recipes/demo.yaml", "--deepspeed_config", "zero2_fp32", "--dry-run"],
               cwd=empty)
    assert '"zero_stage": 2' in dry.stderr

    demo = _run([dat_ds, "demo", "--epochs", "1", "--set", "train.max_steps_per_epoch=2", "--set", "eval.max_examples=32"],
                cwd=empty, timeout=1200)
    run = empty / "runs" / "demo"
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "summary.json", "curves.png", "adv_examples.png"):
        assert (run / name).is_file(), name
    assert any((run / "checkpoint").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    where = summary["provenance"]  # an installed wheel: versions and the command, no git commit
    assert where["git"] is None and where["versions"]["dat-ds"] and where["versions"]["deepspeed"]
    assert where["command"].startswith("dat-ds demo --epochs 1") and where["hosts"] == [socket.gethostname()]
    assert f"outputs in {Path('runs') / 'demo'}/" in demo.stdout
    # Quiet by default: none of DeepSpeed's start-up chatter.
    for noise in ("Setting accelerator to CPU", "[launch.py", "[runner.py", "shm_comm_op built", "CUDA_HOME"):
        assert noise not in demo.stdout + demo.stderr, noise


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_pip_install_with_dependencies_keeps_the_installed_torch(tmp_path):
    """A cluster's environment already has its torch: ``pip install dat_ds-*.whl`` (dependencies and all,
    deepspeed built from its sdist) must keep that torch, here the oldest one scripts/compat.sh tests."""
    import re

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    oldest = re.search(r'^OLDEST_TORCH="([^"]*)"', (REPO / "scripts" / "compat.sh").read_text(), re.M).group(1)
    dist = tmp_path / "dist"
    _run([uv, "build", "--wheel", "-o", str(dist)], cwd=REPO, timeout=300)
    (wheel,) = dist.glob("dat_ds-*.whl")
    venv = tmp_path / "venv"
    _run([uv, "venv", "-q", "--seed", "--python", sys.executable, str(venv)], cwd=tmp_path)
    py = str(venv / "bin" / "python")
    _run([uv, "pip", "install", "-q", "--python", py, *oldest.split()], cwd=tmp_path, timeout=1800)
    versions = [py, "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__)"]
    before = _run(versions, cwd=tmp_path).stdout
    assert before.split()[0].startswith(oldest.split()[0].split("==")[1])

    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], cwd=tmp_path, timeout=1800)
    assert _run(versions, cwd=tmp_path).stdout == before
    _run([py, "-m", "pip", "check"], cwd=tmp_path)
    _run([str(venv / "bin" / "dat-ds"), "--help"], cwd=tmp_path)
    _run([py, "-c", "import deepspeed, dat_ds.runtime.trainer"], cwd=tmp_path)
