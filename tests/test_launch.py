"""Two "nodes" on one machine: the DeepSpeed launcher started once per node, as on a real cluster.

DeepSpeed's default multi-node path ssh-es (pdsh) into every host of the hostfile; with ``--no_ssh``
the same runner is started on each node by hand (or by a scheduler) with its ``--node_rank``. Here both
"nodes" are local processes sharing a hostfile of two hosts with one slot each and the master address
127.0.0.1, so this exercises the real runner -> launch -> rank path and a 2-process gloo world whose
ranks were started by different launchers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.dist
def test_two_node_launch_trains_one_short_epoch(tmp_path):
    from dat_ds.core.dist import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    run_args = ["--config", str(REPO / "recipes" / "demo.yaml"), "--name", "two-nodes", "--output-dir", str(tmp_path / "runs"),
                "--set", "model.name=tiny_cnn", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=3",
                "--set", "attack.steps=1", "--set", "eval.max_examples=64", "--set", "eval.steps=2",
                "--set", "eval.batch_size=32"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--module", "dat_ds.launch.train", *run_args]
        log = open(tmp_path / f"node{node_rank}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=600) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = {i: (tmp_path / f"node{i}.log").read_text() for i in (0, 1)}
    assert codes == [0, 0], f"exit codes {codes}\nnode0:\n{logs[0][-4000:]}\nnode1:\n{logs[1][-4000:]}"
    # Each launcher started exactly its own rank of a 2-process world.
    for i in (0, 1):
        assert "dist_world_size=2" in logs[i]
        assert f"node_rank={i}" in logs[i]
    summary = json.loads((tmp_path / "runs" / "two-nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2
    final = summary["final"]
    assert final["epoch"] == 1 and final["eval_count"] == 64
    assert final["train_loss"] > 0 and 0.0 <= final["robust_acc"] <= final["clean_acc"] <= 1.0
    steps = [json.loads(line) for line in (tmp_path / "runs" / "two-nodes" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "epoch" for r in steps)


def test_cpu_shm_comm_op_is_marked_incompatible_before_init():
    """On the CPU accelerator DeepSpeed's shm comm op (only ``inference_all_reduce`` uses it) is never built."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from dat_ds.core import dist

    acc = dist.accelerator()
    if acc.device_name() != "cpu":
        pytest.skip("the shm op is a CPU-accelerator detail")
    dist._skip_cpu_shm_op(acc)
    assert deepspeed.ops.__compatible_ops__[acc.create_op_builder("ShareMemCommBuilder").NAME] is False
    assert build_shm_op() is None  # returns at once: no compiler, no /dev/shm segment


@pytest.mark.dist
def test_two_rank_run_is_quiet_builds_nothing_and_leaves_no_shm(tmp_path):
    """A first run on a fresh machine: no JIT compile on the critical path, no leaked /dev/shm segment,
    and none of DeepSpeed's start-up chatter unless --verbose."""
    from conftest import run_cli

    ext = tmp_path / "torch_extensions"  # an empty extensions cache, as on a fresh machine
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    proc = run_cli("train", "--recipe", "demo", "--nproc", "2", "--name", "quiet", "--output-dir", str(tmp_path / "runs"),
                   "--set", "model.name=tiny_cnn", "--epochs", "1", "--set", "train.max_steps_per_epoch=2",
                   "--set", "attack.steps=1", "--set", "eval.max_examples=32", "--set", "eval.steps=1",
                   cwd=tmp_path, env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for noise in ("Setting accelerator to CPU", "[launch.py", "[runner.py", "shm_comm_op built", "CUDA_HOME"):
        assert noise not in out, noise
    assert "run quiet: 2 rank(s)" in out and "epoch 1/1" in out
    assert not (ext.exists() and any(ext.rglob("*shm*")))
    if os.path.isdir("/dev/shm"):
        leaked = {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("deepspeed_allreduce_buffer")}
        assert not leaked
