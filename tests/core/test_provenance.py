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


def test_a_run_says_what_it_trains_on_where_its_outputs_go_and_records_its_command(tmp_path, dat_ds_log, capsys):
    import json
    import os
    import stat

    from dat_ds import cli
    from dat_ds.core.io import umask
    from tests.helpers import tiny_args, write_ds

    argv = ["train", *tiny_args(tmp_path, "r", write_ds(tmp_path), "--set", "eval.attack=apgd-ce-dlr", epochs=1, subset=64)]
    assert cli.main(argv) == 0
    run = tmp_path / "r"
    assert "data fashion-mnist: 64 training images, 10 classes, 1x28x28" in dat_ds_log.text
    assert "data fashion-mnist: 2000 test images" in dat_ds_log.text
    table = " ".join(capsys.readouterr().out.split())  # the closing table names the attack behind "robust acc"
    assert "robust acc (APGD-CE+DLR-1@0.1)" in table.replace("│ ", "").replace(" │", ""), table
    assert f"outputs in {run}" in dat_ds_log.text  # at the start and at the end
    assert os.environ.get(COMMAND_ENV) is None  # the command's own, not left for the next one
    summary = json.loads((run / "summary.json").read_text())
    assert summary["provenance"]["command"] == "dat-ds " + " ".join(argv)
    assert stat.S_IMODE((run / "summary.json").stat().st_mode) == 0o666 & ~umask()
