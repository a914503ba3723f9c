"""Installable where a cluster is: the dependency ranges keep a cluster's own torch, ``scripts/compat.sh`` runs
the tested Python x torch matrix, ``scripts/wheelhouse.sh`` makes the wheels of an offline install and
``scripts/gpu_smoke.sh`` starts the GPU smoke from them on a bare machine (here: as far as a CPU goes).

The fast tests read files and start at most one interpreter; everything that builds a venv or downloads
torch is ``slow``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO / "scripts" / "compat.sh"
WHEELHOUSE = REPO / "scripts" / "wheelhouse.sh"
GPU_SMOKE = REPO / "scripts" / "gpu_smoke.sh"


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]}


def _compat_var(name: str) -> str:
    return re.search(rf'^{name}="([^"]*)"', COMPAT.read_text(), re.M).group(1)


def _matrix() -> list[tuple[str, str, list[str]]]:
    """compat.sh's default matrix: (python, torch spec, extra options), OLDEST_TORCH expanded."""
    block = re.search(r"^MATRIX=\(\n(.*?)^\)", COMPAT.read_text(), re.M | re.S).group(1)
    entries = []
    for line in re.findall(r'^\s*"([^"]*)"', block, re.M):
        py, torch, extra = line.replace("$OLDEST_TORCH", _compat_var("OLDEST_TORCH")).split("|")
        entries.append((py, torch, extra.split()))
    return entries


def _oldest_torch() -> dict[str, str]:
    return dict(pin.split("==") for pin in _compat_var("OLDEST_TORCH").split())


def _env(**extra: str) -> dict[str, str]:
    drop = ("VIRTUAL_ENV", "PYTHONPATH", "DAT_DS_VERBOSE", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OUT", "WHEEL_DIR", "PY")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _run(cmd: list[str], timeout: float, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{shlex.join(map(str, proc.args))} failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _find_python(version: str) -> str:
    proc = _run(["bash", str(COMPAT), "--find-python", version], timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"no Python {version} on this machine")
    return proc.stdout.strip()


# ----------------------------------------------------------------------------- fast: the published ranges


def test_requirements_are_ranges_whose_floors_compat_sh_tests():
    reqs = _requirements()
    for name in ("torch", "torchvision", "deepspeed", "timm", "datasets", "numpy"):
        spec = reqs[name].specifier
        assert spec and all(s.operator == ">=" for s in spec), f"{name}{spec}: a range keeps a cluster's own build"
    for name, version in _oldest_torch().items():  # the floor is the oldest version the matrix runs
        assert str(reqs[name].specifier) == f">={Version(version).major}.{Version(version).minor}", (name, version)
    assert _matrix()[0][2] == ["--floors"], "the oldest entry installs every dependency at its floor"


def test_python_range_has_no_cap_and_the_matrix_spans_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    pythons = [py for py, _, _ in _matrix()]
    assert pythons[0] == "3.10" and Version(pythons[-1]) >= Version("3.13")


def test_locked_versions_fall_in_the_ranges():
    locked = {p["name"]: p["version"] for p in tomllib.loads((REPO / "uv.lock").read_text())["package"]}
    for name, req in _requirements().items():
        assert Version(locked[name]) in req.specifier, (name, locked[name], str(req.specifier))


def test_compat_sh_names_a_missing_python_with_exit_3():
    proc = _run(["bash", str(COMPAT), "--find-python", "2.1"], timeout=60)
    assert proc.returncode == 3 and "no Python 2.1 found" in proc.stderr


# ----------------------------------------------------------------------------- fast: gpu_smoke.sh's early exits


def test_gpu_smoke_without_wheels_says_how_to_make_them(tmp_path):
    (tmp_path / "wheels").mkdir()
    proc = _run(["bash", str(GPU_SMOKE), "--wheels", str(tmp_path / "wheels"), "--out", str(tmp_path / "out"),
                 "--python", sys.executable], timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "FATAL: no wheels in" in proc.stdout and "scripts/wheelhouse.sh" in proc.stdout
    assert (tmp_path / "out" / "gpu_smoke.log").is_file()


def test_gpu_smoke_fails_fast_without_a_cuda_device(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = _run(["bash", str(GPU_SMOKE), "--system", "--python", sys.executable, "--out", str(tmp_path / "out")],
                timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    fatal = [ln for ln in proc.stdout.splitlines() if "FATAL" in ln]
    assert len(fatal) == 1 and "no CUDA device" in fatal[0] and "--allow-cpu" in fatal[0], proc.stdout
    env = (tmp_path / "out" / "env.txt").read_text()
    assert f"torch {torch.__version__}" in env and "deepspeed " in env  # the machine, captured before the exit


# ----------------------------------------------------------------------------- slow: the real installs


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("python, torch, extra", _matrix(), ids=[f"py{m[0]}" for m in _matrix()])
def test_compat_matrix_entry(python, torch, extra):
    """One entry of compat.sh's matrix: install next to that torch, then the CLI, training, 2 ranks, AutoAttack."""
    if shutil.which("uv") is None:
        pytest.skip("uv is not on PATH")
    _find_python(python)
    proc = _ok(_run(["bash", str(COMPAT), "--python", python, "--torch", torch, *extra], timeout=3000))
    assert "compat: OK" in proc.stdout
    for name, version in (_oldest_torch().items() if extra == ["--floors"] else ()):
        assert f"{name} {version}" in proc.stdout  # what it ran is what it was asked for


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_wheelhouse_installs_offline_next_to_an_older_torch_and_starts_the_gpu_smoke(tmp_path):
    """wheelhouse.sh for Python 3.12, then on a 'bare machine' (a 3.12 venv with only the oldest torch):
    gpu_smoke.sh --wheels reaches the smoke's start, and ``pip install --no-index`` keeps that torch."""
    if shutil.which("uv") is None:
        pytest.skip("uv is not on PATH")
    python = _find_python("3.12")
    wheels = tmp_path / "wheels"
    _ok(_run(["bash", str(WHEELHOUSE), "--python", "3.12", "--out", str(wheels)], timeout=1200))
    names = {w.name.split("-")[0].lower() for w in wheels.glob("*.whl")}
    assert {"dat_ds", "deepspeed", "pydantic", "pydantic_core", "hjson", "torchattacks", "timm"} <= names
    assert not names & {"torch", "torchvision", "triton"} and not any(n.startswith("nvidia") for n in names)
    assert len(list(wheels.glob("deepspeed-*-py3-none-any.whl"))) == 1

    venv = tmp_path / "venv"
    py = str(venv / "bin" / "python")
    _ok(_run(["uv", "venv", "-q", "--seed", "--python", python, str(venv)], timeout=300))
    oldest = _oldest_torch()
    _ok(_run(["uv", "pip", "install", "-q", "--python", py, *(f"{k}=={v}" for k, v in oldest.items())], timeout=1800))
    versions = "import torch, torchvision; print(torch.__version__, torchvision.__version__)"
    before = _ok(_run([py, "-c", versions], timeout=300)).stdout

    # The bare machine: nothing but torch. gpu_smoke.sh installs the rest from the folder and, with no CUDA
    # here, gets as far as the smoke's own one-line refusal.
    out = tmp_path / "smoke"
    proc = _run(["bash", str(GPU_SMOKE), "--wheels", str(wheels), "--python", py, "--allow-cpu", "--out", str(out)],
                timeout=900)
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "imports ok" in proc.stdout and "error: bench gpu-smoke needs a CUDA device" in proc.stdout
    assert "deepspeed " in (out / "env.txt").read_text() and (out / "pip.log").is_file()

    # The offline install proper: pip resolves dat-ds from the folder alone and keeps the machine's torch.
    _ok(_run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "dat-ds"], timeout=900,
             PIP_CONFIG_FILE=os.devnull))
    assert _ok(_run([py, "-c", versions], timeout=300)).stdout == before
    _ok(_run([py, "-m", "dat_ds.cli", "--help"], timeout=300, cwd=tmp_path))
    where = _ok(_run([py, "-c", "import deepspeed, dat_ds.runtime.trainer; print(dat_ds.__file__)"], timeout=300,
                     cwd=tmp_path)).stdout
    assert str(venv) in where
