"""Two "nodes" on one machine: the DeepSpeed launcher started once per node, as on a real cluster.

DeepSpeed's default multi-node path ssh-es (pdsh) into every host of the hostfile; with ``--no_ssh``
the same runner is started on each node by hand (or by a scheduler) with its ``--node_rank``. Each
"node" here is a command that calls the project's one launcher, ``launch(..., node=NodeLaunch(...))``,
with a shared hostfile of two hosts with one slot each. Two variants:

* ``localhost``: both nodes in this machine's network, master address 127.0.0.1;
* ``netns``: each node inside its own network namespace, joined by a veth pair with the addresses
  10.231.<id>.1 / .2 (``benchmarks.netns``): two hosts that can reach each other only over that
  link, gloo bound to it. Needs root and iproute2; skipped with the reason otherwise.

Either way this exercises the real runner -> launch -> rank path and a 2-process gloo world whose ranks
were started by different launchers. No namespace outlives the test (and ``conftest`` removes any this
session left at its end). A third test takes node 1's end of the link down mid-run: both nodes end within
the collective timeout, each with one line naming the peer it lost and the last checkpoint, which is intact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

# One node: the launcher call a scheduler would make on that machine, under the one run entry (which
# prints a failure as one `error:` line and exits with its code, as `dat-ds` does).
NODE_SCRIPT = """
import json, sys
from dat_ds.launch.entry import run_entry
from dat_ds.launch.launcher import NodeLaunch, launch
a = json.loads(sys.argv[1])
sys.exit(run_entry(lambda: launch("dat_ds.train", a["argv"], nproc=1, hostfile=a["hostfile"],
                                  master_port=a["port"], env=a["env"],
                                  node=NodeLaunch(a["node_rank"], a["master_addr"], tuple(a["prefix"])))))
"""


def _start_nodes(tmp_path: Path, run_args: list[str], link, env_extra: dict[str, str]) -> list[tuple]:
    """Node 0 and node 1 of one run (each its own launcher; inside ``link``'s namespaces unless None);
    returns ``(process, log file)`` pairs, output in ``tmp_path/node<i>.log``."""
    from dat_ds.core.dist import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", **env_extra)
    procs = []
    for node_rank in (0, 1):
        spec = {"argv": run_args, "hostfile": str(hostfile), "port": port, "node_rank": node_rank,
                "master_addr": link.addrs[0] if link else "127.0.0.1",
                "prefix": list(link.exec_prefix(node_rank)) if link else [],
                "env": {"GLOO_SOCKET_IFNAME": link.ifnames[node_rank]} if link else {}}
        log = open(tmp_path / f"node{node_rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, json.dumps(spec)], cwd=tmp_path, env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _stop_nodes(procs: list[tuple]) -> None:
    for p, log in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()


@pytest.mark.dist
# localhost: the same launch path as netns without the network between the "nodes" (slow: netns covers it)
@pytest.mark.parametrize("network", [pytest.param("localhost", marks=pytest.mark.slow), "netns"])
def test_two_node_launch_trains_one_short_epoch(tmp_path, network):
    from benchmarks import netns

    if network == "netns" and (reason := netns.unavailable()) is not None:
        pytest.skip(f"two nodes in network namespaces: {reason}")
    run_args = ["--config", str(REPO / "recipes" / "demo.yaml"), "--name", "two-nodes", "--output-dir", str(tmp_path / "runs"),
                "--set", "model.name=tiny_cnn", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=3",
                "--set", "attack.steps=1", "--set", "eval.max_examples=64", "--set", "eval.steps=2",
                "--set", "eval.batch_size=32"]
    link = netns.NetnsLink() if network == "netns" else None
    procs = []
    try:
        if link is not None:
            link.open()
        # verbose, so DeepSpeed's launcher prints the world it started
        procs = _start_nodes(tmp_path, run_args, link, {"DAT_DS_VERBOSE": "1"})
        codes = [p.wait(timeout=600) for p, _ in procs]
        sent = [link.tx_bytes(i) for i in (0, 1)] if link else []
    finally:
        _stop_nodes(procs)
        if link is not None:
            link.close()
    if link is not None:
        assert not netns.owned_by(os.getpid()), "the test's namespaces were not deleted"
        assert sent[1] > 20_000, f"node 1 sent only {sent[1]} bytes over the link"  # gradients went over the veth
    logs = {i: (tmp_path / f"node{i}.log").read_text() for i in (0, 1)}
    assert codes == [0, 0], f"exit codes {codes}\nnode0:\n{logs[0][-4000:]}\nnode1:\n{logs[1][-4000:]}"
    # Each launcher started exactly its own rank of a 2-process world.
    for i in (0, 1):
        assert "dist_world_size=2" in logs[i]
        assert f"node_rank={i}" in logs[i]
    if link is not None:  # node 1 met the master at node 0's address on the link
        assert link.addrs[0] in logs[1]
    summary = json.loads((tmp_path / "runs" / "two-nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2
    final = summary["final"]
    assert final["epoch"] == 1 and final["eval_count"] == 64
    assert final["train_loss"] > 0 and 0.0 <= final["robust_acc"] <= final["clean_acc"] <= 1.0
    steps = [json.loads(line) for line in (tmp_path / "runs" / "two-nodes" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "epoch" for r in steps)


LINK_TIMEOUT_S = 15  # dist.timeout_s of the link-loss run: how long a collective waits for the lost peer
LINE = re.compile(r"error: rank (\d) \(node (\d), ([0-9.]+)\) lost contact after training step (\d+) \(epoch \d+\): "
                  r"no reply within 15 s \(gloo; dist.timeout_s\)(, and the master's store at [0-9.]+:\d+ does not answer "
                  r"either)?; last checkpoint: (\S+); resume with --resume auto")


@pytest.mark.slow  # two nodes' start-up, then the timeout: 100-140 s on the shared 2-core machine
@pytest.mark.dist
def test_a_node_that_loses_its_link_ends_both_nodes_with_one_line(tmp_path):
    """Node 1's end of the veth goes down after the first checkpoint (no FIN, no RST: a pulled cable). Each
    node's collective waits dist.timeout_s, the ranks still in contact check in at the store, and each node
    ends with exit code 4 and one line naming the peer it lost; the last checkpoint is intact."""
    from benchmarks import netns
    from dat_ds.core.errors import EXIT_PEER_LOST
    from dat_ds.runtime import checkpoint
    from tests.helpers import model_state, snapshot

    if (reason := netns.unavailable()) is not None:
        pytest.skip(f"two nodes in network namespaces: {reason}")
    runs = tmp_path / "runs"
    root = runs / "lost" / "checkpoint"
    run_args = ["--config", str(REPO / "recipes" / "demo.yaml"), "--name", "lost", "--output-dir", str(runs),
                "--set", "model.name=tiny_cnn", "--set", "train.epochs=5", "--set", "train.save_every_steps=2",
                "--set", "train.keep_last=100", "--set", "attack.steps=1", "--set", "eval.max_examples=16",
                "--set", "eval.steps=1", "--set", "eval.batch_size=16", "--set", f"dist.timeout_s={LINK_TIMEOUT_S}"]
    procs = []
    with netns.NetnsLink() as link:
        try:
            procs = _start_nodes(tmp_path, run_args, link, {"DAT_DS_THREADS_PER_RANK": "1"})
            deadline = time.monotonic() + 300  # two ranks' start-up on a shared 2-core machine
            while not checkpoint.complete_tags(root):
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                assert all(p.poll() is None for p, _ in procs), "a node ended before its first checkpoint"
                time.sleep(0.05)
            first = checkpoint.complete_tags(root)[0][1]
            before = snapshot(root / first)
            link.set_link(1, up=False)
            t_down = time.monotonic()
            assert not link.link_up(1)
            codes = [p.wait(timeout=LINK_TIMEOUT_S + 60) for p, _ in procs]
            elapsed = time.monotonic() - t_down
        finally:
            _stop_nodes(procs)
    assert not netns.owned_by(os.getpid()), "the test's namespaces were not deleted"
    logs = {i: (tmp_path / f"node{i}.log").read_text() for i in (0, 1)}
    shown = f"\nnode0:\n{logs[0][-3000:]}\nnode1:\n{logs[1][-3000:]}"
    assert codes == [EXIT_PEER_LOST, EXIT_PEER_LOST], f"exit codes {codes}{shown}"
    assert LINK_TIMEOUT_S - 2 < elapsed < LINK_TIMEOUT_S + 25, f"{elapsed:.1f}s from link down to both ended{shown}"
    steps = set()
    for node, peer in ((0, 1), (1, 0)):  # each node names the other: the one it can no longer reach
        errors = [ln for ln in logs[node].splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, f"node {node}: {errors}{shown}"
        m = LINE.fullmatch(errors[0])
        assert m, errors[0]
        assert (int(m[1]), int(m[2]), m[3]) == (peer, peer, link.addrs[peer]), errors[0]
        assert bool(m[5]) == (node == 1)  # node 1 cannot reach the store on node 0 either; node 0 still can
        steps.add(int(m[4]))
        named = Path(m[6])
        assert named.parent == root and named.name in {t for _, t in checkpoint.complete_tags(root)}
        checkpoint.verify_tag(root, named.name)  # sizes as committed, and every .pt opens
        assert model_state(named)  # the weights load
    assert len(steps) == 1  # both were in the same step's collective
    assert snapshot(root / first) == before  # the first checkpoint was not touched by the failure
    assert named.name == checkpoint.complete_tags(root)[-1][1]  # the newest committed one is named


def test_only_a_collective_that_lost_its_peer_starts_the_check_in():
    """The check-in waits for the other ranks, so an error of this rank alone must not start it: it would
    blame peers that are only waiting for this one."""
    from dat_ds.core import dist

    assert dist.Peer(1, 1, "10.231.20.2").describe() == "rank 1 (node 1, 10.231.20.2)"
    assert dist.Peer(3, None, "gpu-7").describe() == "rank 3 (gpu-7)"
    gloo_timeout = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
                                "Timed out waiting 15000ms for recv operation to complete")
    assert dist._is_lost_peer_error(gloo_timeout)
    assert dist._is_lost_peer_error(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert not dist._is_lost_peer_error(RuntimeError("DataLoader worker (pid 7) timed out after 5 seconds"))
    assert not dist._is_lost_peer_error(RuntimeError("gloo: tensors must be contiguous"))
    assert dist.lost_contact(gloo_timeout, during="after training step 1 (epoch 1)") is None  # no peers to lose


def test_a_node_launch_needs_a_hostfile_and_a_shared_port(tmp_path):
    from dat_ds.core.errors import ConfigError
    from dat_ds.launch.launcher import NodeLaunch, launch

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    with pytest.raises(ConfigError, match="hostfile and a master port"):
        launch("dat_ds.train", [], nproc=1, node=NodeLaunch(0, "127.0.0.1"))
    with pytest.raises(ConfigError, match="hostfile and a master port"):
        launch("dat_ds.train", [], nproc=1, hostfile=str(hostfile), node=NodeLaunch(1, "127.0.0.1"))


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
    from tests.helpers import run_cli

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
