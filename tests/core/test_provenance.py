"""summary.json and eval.json say where a result came from."""

from __future__ import annotations

import subprocess
from pathlib import Path

from dat_ds.core.provenance import COMMAND_ENV, git_commit, provenance

REPO = Path(__file__).resolve().parents[2]


def test_provenance_of_a_checkout(monkeypatch):
    monkeypatch.setenv(COMMAND_ENV, "dat-ds train --recipe demo")
    out = provenance(world_size=2, hosts=["node-a", "node-b"])
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert out["git"]["commit"] == head and isinstance(out["git"]["dirty"], bool)
    assert out["command"] == "dat-ds train --recipe demo"
    assert out["world_size"] == 2 and out["hosts"] == ["node-a", "node-b"]
    assert {"python", "dat-ds", "torch", "deepspeed", "timm", "torchvision", "cuda"} <= out["versions"].keys()
    assert out["versions"]["deepspeed"]


def test_no_commit_outside_a_checkout(tmp_path, monkeypatch):
    assert git_commit(tmp_path) is None
    monkeypatch.delenv(COMMAND_ENV, raising=False)
    assert "pytest" in provenance(world_size=1, hosts=["h"])["command"]  # this process's own command line
