"""Every way people start ranks forms one world (issue 26).

torchrun and the DeepSpeed launcher export torch's variables (RANK ...); srun and mpirun/mpiexec export
their own, which ``core.dist.cluster_env`` maps to torch's. Unit tests of that mapping and of the launcher's
command (the user's visible GPUs are the ones used), then real 2-process worlds on CPU (gloo): torchrun,
ranks started with SLURM's and Open MPI's variables as srun and mpirun do, and mpirun itself where installed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dat_ds.core.dist import ClusterEnv, cluster_env, first_host, tasks_per_node
from dat_ds.core.errors import ConfigError
from tests.helpers import REPO, wait_for_tag

RUN_TIMEOUT_S = 300  # two ranks' start-up and two steps on a shared 2-core machine: ~30 s; a hang ends here


# srun's variables for task `rank` of a 2 nodes x 8 tasks step (what slurmstepd and srun export).
def _slurm(rank: int, **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 8),
            "SLURM_NODEID": str(rank // 8), "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
            "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_NODELIST": "gpu[01-02]",
            "SLURM_JOB_NODELIST": "gpu[01-02]", **extra}


# What Open MPI 4.1's mpirun exported to rank 1 of `mpirun -np 2` on one node (captured).
OPEN_MPI_RANK1 = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1",
                  "OMPI_MCA_ess_base_jobid": "1927544833", "PMIX_NAMESPACE": "1927544833", "PMIX_RANK": "1",
                  "OMPI_MCA_orte_hnp_uri": "1927544832.0;tcp://192.0.2.2:47629"}


# ----------------------------------------------------------------------------- the mapping


def _ranks(found: ClusterEnv) -> tuple[str, int, int, int, int]:
    return found.launcher, found.rank, found.world_size, found.local_rank, found.local_world_size


@pytest.mark.parametrize(("nodelist", "first"), [
    ("gpu[01-04,07],login1", "gpu01"),
    ("login1,gpu[01-04]", "login1"),
    ("node7", "node7"),
    ("gpu[007-011]", "gpu007"),  # zero padding kept
    ("gpu[5,1-3]", "gpu5"),  # the first as listed
    ("rack[2-3]-n[08,10],x1", "rack2-n08"),  # several brackets in one name
    ("a-b-c[1-2]", "a-b-c1"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize(("counts", "per_node"), [
    ("8(x2)", [8, 8]), ("4,2", [4, 2]), ("2(x3),1", [2, 2, 2, 1]), ("1", [1]),
])
def test_slurm_tasks_per_node(counts, per_node):
    assert tasks_per_node(counts) == per_node


def test_srun_task_becomes_its_rank_with_node_zero_as_master():
    found = cluster_env(_slurm(11))
    assert _ranks(found) == ("SLURM", 11, 16, 3, 8)
    assert found.master_addr == "gpu01" and 20000 <= found.master_port < 32000
    assert found.describe() == f"SLURM: rank 11 of 16, local 3 of 8, master gpu01:{found.master_port}"
    assert found.variables() == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                                 "LOCAL_SIZE": "8", "MASTER_ADDR": "gpu01", "MASTER_PORT": str(found.master_port)}
    # Every task of the step derives the same rendezvous; another step of the job a different port.
    assert all((cluster_env(_slurm(r)).master_addr, cluster_env(_slurm(r)).master_port) ==
               (found.master_addr, found.master_port) for r in range(16))
    assert cluster_env(_slurm(11, SLURM_STEP_ID="1")).master_port != found.master_port


def test_srun_with_uneven_tasks_per_node_and_a_hostlist_of_names():
    env = _slurm(5, SLURM_NTASKS="6", SLURM_STEP_NUM_TASKS="6", SLURM_STEP_TASKS_PER_NODE="4,2", SLURM_NODEID="1",
                 SLURM_LOCALID="1", SLURM_STEP_NODELIST="login1,gpu[01-04]")
    found = cluster_env(env)
    assert (found.rank, found.world_size, found.local_rank, found.local_world_size) == (5, 6, 1, 2)
    assert found.master_addr == "login1"


def test_a_batch_script_without_srun_or_a_one_task_step_stays_a_world_of_one():
    batch = {k: v for k, v in _slurm(0).items() if not k.startswith("SLURM_STEP_")}  # sbatch's own shell
    assert cluster_env(batch) is None
    assert cluster_env(_slurm(0, SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1")) is None
    assert cluster_env({"HOME": "/root"}) is None  # plain `python -m dat_ds.train`


def test_torchrun_or_deepspeed_launcher_variables_are_left_alone():
    assert cluster_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", **_slurm(3)}) is None
    assert cluster_env({"RANK": "0", **OPEN_MPI_RANK1}) is None


def test_user_master_addr_and_port_win():
    found = cluster_env(_slurm(2, MASTER_ADDR="10.0.0.9", MASTER_PORT="29999"))
    assert (found.master_addr, found.master_port) == ("10.0.0.9", 29999)
    only_addr = cluster_env({**OPEN_MPI_RANK1, "OMPI_COMM_WORLD_SIZE": "4", "MASTER_ADDR": "node0"})
    assert only_addr.master_addr == "node0" and 20000 <= only_addr.master_port < 32000


def test_open_mpi_on_one_node_meets_on_loopback_at_a_port_from_its_job():
    rank1 = cluster_env(OPEN_MPI_RANK1)
    rank0 = cluster_env({**OPEN_MPI_RANK1, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert _ranks(rank1) == ("Open MPI", 1, 2, 1, 2)
    assert rank1.master_addr == rank0.master_addr == "127.0.0.1"
    assert rank1.master_port == rank0.master_port
    other_job = cluster_env({**OPEN_MPI_RANK1, "PMIX_NAMESPACE": "77", "OMPI_MCA_ess_base_jobid": "77"})
    assert other_job.master_port != rank1.master_port


def test_mpirun_inside_a_slurm_allocation_is_open_mpi():
    """The ranks inherit SLURM's variables from the batch shell (or orted's srun step): MPI's say who they are."""
    found = cluster_env({**_slurm(0, SLURM_NTASKS="4"), **OPEN_MPI_RANK1})
    assert (found.launcher, found.rank, found.world_size) == ("Open MPI", 1, 2)


def test_multi_node_mpi_without_master_addr_is_one_line_saying_what_to_export():
    env = {**OPEN_MPI_RANK1, "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    with pytest.raises(ConfigError, match=r"export MASTER_ADDR=.* and MASTER_PORT=") as e:
        cluster_env(env)
    assert "\n" not in str(e.value)


def test_mpich_and_intel_mpi_hydra():
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4", "PMI_FD": "7"}
    with pytest.raises(ConfigError, match="export MASTER_PORT"):  # nothing names the job: no port every rank derives
        cluster_env(env)
    found = cluster_env({**env, "MASTER_PORT": "23456"})
    assert _ranks(found) == ("MPICH/Intel MPI", 3, 4, 3, 4)
    assert (found.master_addr, found.master_port) == ("127.0.0.1", 23456)
    assert cluster_env({**env, "SLURM_JOB_ID": "99"}).master_port == cluster_env({**env, "SLURM_JOB_ID": "99",
                                                                                  "PMI_RANK": "0"}).master_port


def test_pmi_without_node_locality_is_refused():
    with pytest.raises(ConfigError, match="MPI_LOCALRANKID"):
        cluster_env({"PMI_RANK": "1", "PMI_SIZE": "2"})


def test_adopting_exports_torch_variables_and_logs_once(monkeypatch, dat_ds_log):
    import logging

    from dat_ds.core import dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that teardown removes what adopting sets
        monkeypatch.delenv(key)
    for key, value in _slurm(0).items():
        monkeypatch.setenv(key, value)
    dat_ds_log.set_level(logging.INFO, logger="dat_ds")
    # A process that is about to adopt has no process group yet; an earlier test may have left one (a world of 1),
    # which dist.rank()/world_size() would read instead of the environment.
    monkeypatch.setattr(dist, "_tdist", lambda: None)
    found = dist.adopt_cluster_env()
    assert isinstance(found, ClusterEnv) and os.environ["WORLD_SIZE"] == "16" and os.environ["MASTER_ADDR"] == "gpu01"
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.local_world_size()) == (0, 16, 0, 8)
    assert dist.adopt_cluster_env() is None  # RANK is set now: nothing more to adopt
    # by record: caplog sees one twice where the dat_ds logger still propagates (no setup_logging in this process)
    said = {id(r): r.getMessage() for r in dat_ds_log.records if r.getMessage().startswith("SLURM:")}
    assert list(said.values()) == [found.describe()]


class FakeAccelerator:
    """DeepSpeed's accelerator as ``launch``, ``device()`` and DeepSpeed's runner ask it."""

    def __init__(self, name: str = "cuda", count: int = 8):
        self.name, self.count = name, count

    def device_name(self) -> str:
        return self.name

    def device_count(self) -> int:
        return self.count

    def visible_devices_envs(self) -> list[str]:
        return ["CUDA_VISIBLE_DEVICES"]


@pytest.mark.parametrize(("local_rank", "count", "index"), [(3, 8, 3), (3, 1, 0), (5, 2, 1)])
def test_device_is_local_rank_modulo_the_visible_devices(monkeypatch, local_rank, count, index):
    """One GPU per task (SLURM's --gpus-per-task): every rank's device is its only one, cuda:0."""
    import torch

    from dat_ds.core import dist

    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(dist, "accelerator", lambda: FakeAccelerator(count=count))
    assert dist.device() == torch.device("cuda", index)


# ----------------------------------------------------------------------------- the launcher's command


def _command(environ: dict[str, str], nproc: int = 2, acc=None, **kw):
    from dat_ds.launch.launcher import runner_command

    return runner_command("dat_ds.train", ["--config", "x.yaml"], nproc=nproc, master_port=29600,
                          acc=acc or FakeAccelerator(), environ=environ, **kw)


def test_launch_uses_the_visible_gpus_and_deepspeed_runner_accepts_them(monkeypatch):
    """CUDA_VISIBLE_DEVICES=4,5 --nproc 2: ranks on GPUs 4 and 5. DeepSpeed's own runner, given the command and
    the environment launch() builds, starts launch.py with world info {localhost: [4, 5]}; launch.py then sets
    CUDA_VISIBLE_DEVICES to those ids (launch.py: set_visible_devices_envs)."""
    from deepspeed.launcher import runner

    built = _command({"CUDA_VISIBLE_DEVICES": "4,5"})
    args = list(built.argv)
    assert args[args.index("--include") + 1] == "localhost:4,5" and "--num_gpus" not in args
    assert built.unset == ("CUDA_VISIBLE_DEVICES",)

    started = []

    class Popen:
        returncode = 0

        def __init__(self, cmd, env):
            started.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # what launch() leaves out of the runner's env
    monkeypatch.setattr(runner, "get_accelerator", lambda: FakeAccelerator(count=8))
    monkeypatch.setattr(runner.subprocess, "Popen", Popen)
    runner.main(args[args.index("deepspeed.launcher.runner") + 1:])
    (cmd, _), = started
    info = next(a.split("=", 1)[1] for a in cmd if a.startswith("--world_info="))
    assert json.loads(base64.urlsafe_b64decode(info)) == {"localhost": [4, 5]}


def test_launch_takes_the_first_visible_gpus_and_refuses_more_ranks_than_gpus():
    args = list(_command({"CUDA_VISIBLE_DEVICES": "6, 2,3"}).argv)
    assert args[args.index("--include") + 1] == "localhost:6,2"
    with pytest.raises(ConfigError, match=r"--nproc=3 but CUDA_VISIBLE_DEVICES='4,5' makes 2 cuda device\(s\) visible"):
        _command({"CUDA_VISIBLE_DEVICES": "4,5"}, nproc=3)
    with pytest.raises(ConfigError, match="--nproc=3 but this node has 2 cuda device"):
        _command({}, nproc=3, acc=FakeAccelerator(count=2))
    with pytest.raises(ConfigError, match="device numbers"):
        _command({"CUDA_VISIBLE_DEVICES": "GPU-8e1a1b2c,GPU-77aa"})


def test_launch_without_visible_devices_on_cpu_or_over_ssh_is_unchanged(tmp_path):
    from dat_ds.launch.launcher import NodeLaunch

    def devices(built):
        args = list(built.argv)
        return args[args.index("--module") - 2:args.index("--module")], built.unset

    assert devices(_command({})) == (["--num_gpus", "2"], ())  # every GPU visible: DeepSpeed's 0..N-1 are right
    cpu = FakeAccelerator("cpu", 1)
    assert devices(_command({"CUDA_VISIBLE_DEVICES": "4,5"}, acc=cpu)) == (["--num_gpus", "2"], ())
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=2\nb slots=2\n")
    over_ssh = _command({"CUDA_VISIBLE_DEVICES": "4,5"}, hostfile=str(hostfile))  # remote hosts: their own GPUs
    assert devices(over_ssh) == (["--num_gpus", "2"], ())
    node = NodeLaunch(1, "10.0.0.1")
    from_zero = _command({"CUDA_VISIBLE_DEVICES": "0,1"}, hostfile=str(hostfile), node=node)
    assert devices(from_zero) == (["--num_gpus", "2"], ())
    with pytest.raises(ConfigError, match="cannot be honoured with --hostfile"):
        _command({"CUDA_VISIBLE_DEVICES": "4,5"}, hostfile=str(hostfile), node=node)


# ----------------------------------------------------------------------------- real worlds of 2 on CPU

# Variables of any launcher this test itself runs under: each rank gets only the ones its test gives it.
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")
_TORCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "CROSS_RANK", "TORCHELASTIC_RUN_ID")


def _base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TORCH_ENV and not k.startswith(_LAUNCHER_PREFIXES)}
    # one thread per rank: two ranks share two cores; the CPU accelerator named, so no detection
    return {**env, "PYTHONUNBUFFERED": "1", "DAT_DS_THREADS_PER_RANK": "1", "DS_ACCELERATOR": "cpu", **extra}


def _train_args(tmp_path: Path, name: str) -> list[str]:
    return ["--config", str(REPO / "recipes" / "demo.yaml"), "--name", name, "--output-dir", str(tmp_path / "runs"),
            "--set", "model.name=tiny_cnn", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2",
            "--set", "attack.steps=1", "--set", "eval.max_examples=32", "--set", "eval.steps=1",
            "--set", "eval.batch_size=32"]


def _run(commands: list[tuple[list[str], dict[str, str]]], tmp_path: Path) -> tuple[list[int], list[str]]:
    """Start every command at once; wait for all (bounded: a hang is killed); their exit codes and outputs."""
    logs = [tmp_path / f"proc{i}.log" for i in range(len(commands))]
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        try:
            for (cmd, env), log in zip(commands, logs, strict=True):
                out = files.enter_context(log.open("w"))
                procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + RUN_TIMEOUT_S
            codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return codes, [log.read_text() for log in logs]


def _assert_one_world_of_two(tmp_path: Path, name: str, codes: list[int], outputs: list[str]) -> str:
    shown = "".join(f"\n--- process {i} (exit {c}):\n{o[-3000:]}"
                    for i, (c, o) in enumerate(zip(codes, outputs, strict=True)))
    assert all(c == 0 for c in codes), shown
    everything = "".join(outputs)
    assert f"run {name}: 2 rank(s)" in everything, shown
    assert "1 rank(s)" not in everything, shown
    summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final"]["epoch"] == 1
    return everything


def _derived_free_port(envs: list[dict[str, str]], vary: str) -> list[dict[str, str]]:
    """The ranks' environments with job id ``vary`` chosen so that the port they derive is free here now."""
    for attempt in range(50):
        job = f"{os.getpid()}{attempt}"
        trial = [{**env, vary: job} for env in envs]
        port = cluster_env(trial[0]).master_port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return trial
    raise AssertionError("no free derived port in 50 tries")


@pytest.mark.dist
def test_torchrun_trains_one_world_of_two(tmp_path):
    from dat_ds.core.ports import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "dat_ds.train", *_train_args(tmp_path, "torchrun")]
    codes, outputs = _run([(cmd, _base_env())], tmp_path)
    _assert_one_world_of_two(tmp_path, "torchrun", codes, outputs)


@pytest.mark.dist
def test_ranks_started_as_srun_does_form_one_world(tmp_path):
    """Two processes with the variables srun gives the two tasks of `srun -N1 -n2` (the node list names this
    machine as SLURM would: a resolvable host name)."""
    envs = [_base_env(SLURM_JOB_ID="", SLURM_STEP_ID="0", SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NODEID="0",
                      SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
                      SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost") for r in (0, 1)]
    envs = _derived_free_port(envs, "SLURM_JOB_ID")
    cmd = [sys.executable, "-m", "dat_ds.train", *_train_args(tmp_path, "srun")]
    codes, outputs = _run([(cmd, env) for env in envs], tmp_path)
    everything = _assert_one_world_of_two(tmp_path, "srun", codes, outputs)
    port = cluster_env(envs[0]).master_port
    assert f"SLURM: rank 0 of 2, local 0 of 2, master localhost:{port}" in everything
    assert "SLURM: rank 1" not in everything  # said once, by rank 0


@pytest.mark.dist
def test_srun_ranks_save_and_stop_on_slurms_usr1(tmp_path):
    """`sbatch --signal=USR1@120` sends SIGUSR1 to every task of the job's steps: ranks srun started (no launch()
    around them) with ``train.stop_signals=[SIGUSR1]`` end the step, agree, write the final checkpoint and exit 138
    (what a requeue wrapper tests); rank 0 names the checkpoint to resume from. Unlisted, SIGUSR1 would kill them."""
    import signal

    from dat_ds.runtime import checkpoint

    envs = [_base_env(SLURM_JOB_ID="", SLURM_STEP_ID="0", SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NODEID="0",
                      SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
                      SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost") for r in (0, 1)]
    envs = _derived_free_port(envs, "SLURM_JOB_ID")
    args = [*_train_args(tmp_path, "usr1"), "--set", "train.epochs=40", "--set", "train.max_steps_per_epoch=20",
            "--set", "train.save_every_steps=3", "--set", "train.save_on_signal=true",
            "--set", "train.stop_signals=[SIGUSR1]"]
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    with contextlib.ExitStack() as files:
        procs = [subprocess.Popen([sys.executable, "-m", "dat_ds.train", *args], cwd=tmp_path, env=env,
                                  stdout=files.enter_context(log.open("w")), stderr=subprocess.STDOUT)
                 for env, log in zip(envs, logs, strict=True)]
        try:
            root = tmp_path / "runs" / "usr1" / "checkpoint"
            wait_for_tag(root, procs[0])
            for p in procs:  # as SLURM does: every task of the step, not a launcher
                p.send_signal(signal.SIGUSR1)
            codes = [p.wait(timeout=60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    outputs = [log.read_text() for log in logs]
    assert codes == [138, 138], outputs
    tags = [tag for _, tag in checkpoint.complete_tags(root)]
    assert tags[-1].startswith("step") and int(tags[-1][4:]) < 40 * 20, tags  # stopped early, mid-run
    assert f"interrupted: last complete checkpoint {tags[-1]}; continue with --resume auto" in outputs[0], outputs[0]
    assert "interrupted" not in outputs[1]  # said once, by rank 0


@pytest.mark.dist
def test_ranks_started_as_open_mpi_does_form_one_world(tmp_path):
    envs = [_base_env(OMPI_COMM_WORLD_RANK=str(r), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(r),
                      OMPI_COMM_WORLD_LOCAL_SIZE="2", PMIX_NAMESPACE="") for r in (0, 1)]
    envs = _derived_free_port(envs, "PMIX_NAMESPACE")
    cmd = [sys.executable, "-m", "dat_ds.train", *_train_args(tmp_path, "ompi")]
    codes, outputs = _run([(cmd, env) for env in envs], tmp_path)
    everything = _assert_one_world_of_two(tmp_path, "ompi", codes, outputs)
    assert "Open MPI: rank 0 of 2, local 0 of 2, master 127.0.0.1:" in everything


@pytest.mark.dist
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (apt-get install openmpi-bin)")
def test_mpirun_trains_one_world_of_two(tmp_path):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
           sys.executable, "-m", "dat_ds.train", *_train_args(tmp_path, "mpirun")]
    codes, outputs = _run([(cmd, _base_env())], tmp_path)
    everything = _assert_one_world_of_two(tmp_path, "mpirun", codes, outputs)
    assert "Open MPI: rank 0 of 2, local 0 of 2, master 127.0.0.1:" in everything
