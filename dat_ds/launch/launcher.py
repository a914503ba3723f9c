"""The one launcher: every multi-rank command starts its ranks through ``launch()``.

``launch(module, argv, nproc=N)`` runs ``python -m <module> <argv>`` on N ranks per node through the
DeepSpeed launcher (``--hostfile`` for several nodes), the same way users start DeepSpeed programs. Where
every rank it starts is local (one node, or one node's ranks of a multi-node run: ``NodeLaunch``) it gives
them a folder for their exit reports and, when the run fails, raises ``RankFailure`` with one line naming the
rank that failed first -- for a rank that lost contact with a peer, the line naming that peer, its node and
address, and the last checkpoint (exit code 4, ``core.dist.lost_contact``). Nothing here imports torch.

Devices: on GPUs the ranks use the devices this process may use, as the user or the scheduler set them
(CUDA_VISIBLE_DEVICES=4,5: GPUs 4 and 5, not DeepSpeed's 0 and 1): ``device_flags``.

Signals: the launcher starts in its own session, so a terminal's Ctrl-C reaches this process only.
SIGTERM/SIGINT here are forwarded (as SIGTERM) to the launcher's whole process group (the DeepSpeed launcher
and every rank), and so are the run's ``stop_signals`` (SIGUSR1/SIGUSR2 of ``train.stop_signals``, as they
are); every process of the run is waited for with a bound (then SIGKILLed), and ``Interrupted`` is raised:
exit code 128 + signal (143 TERM, 130 INT, 138 USR1), one line naming the last complete checkpoint. The
ranks also get this process's PID (``DAT_DS_CLI_PID``) and exit within about a second once it is gone, so a
SIGKILLed ``dat-ds`` leaves nothing running either (``status.watch_cli``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..core.errors import EXIT_PEER_LOST, ConfigError, Interrupted
from ..core.io import read_user_text
from ..core.ports import free_port
from ..core.stop import GRACE_ENV
from .status import CLI_PID_ENV, STATUS_ENV, failed_rank_line

log = logging.getLogger(__name__)

LAUNCH_FLAGS = ("--nproc", "--num_gpus", "--num-gpus", "--hostfile", "--master-port")  # the launching command's
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_S = 20.0  # after a forwarded signal: then SIGKILL, so nothing outlives the command by 30 s


class RankFailure(Exception):
    """A rank of a launched run failed; the others were stopped. Printed as one line."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.code = code


def strip_launch_args(argv: list[str], flags: tuple[str, ...] = LAUNCH_FLAGS) -> list[str]:
    """Remove launcher-only flags (and their values) before forwarding argv to the ranks."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = "=" not in a
            continue
        out.append(a)
    return out


# RFC 1123 host names (letters, digits, '-' per label, no '-' at either end) or IPv4 addresses: nothing that a
# shell would read as more than a name reaches the ssh/pdsh command lines DeepSpeed builds from a hostfile.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_HOSTFILE_LINE = re.compile(r"(\S+)\s+slots\s*=\s*(\S+)")


def read_hostfile(hostfile: str) -> list[tuple[str, int]]:
    """The ``(host, slots)`` lines of a DeepSpeed hostfile, checked: one ``HOST slots=N`` per line (``#`` comments),
    valid host names, N >= 1, no host twice, at least one host. Each problem is one line naming the entry."""
    path = Path(hostfile)
    if path.is_dir():
        raise ConfigError(f"hostfile {hostfile!r} is a folder; give a file of 'host slots=N' lines, one per node")
    if not path.is_file():
        raise ConfigError(f"hostfile {hostfile!r} not found; write one 'host slots=N' line per node")
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(read_user_text(path, f"hostfile {hostfile!r}").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile {hostfile!r} line {number} ({line!r})"
        match = _HOSTFILE_LINE.fullmatch(line)
        if match is None:
            raise ConfigError(f"{where} is not 'HOST slots=N'; write one node per line, e.g. 'worker-1 slots=8'")
        host, slots = match.groups()
        if len(host) > 253 or not HOSTNAME.fullmatch(host):
            raise ConfigError(f"{where}: {host!r} is not a host name (RFC 1123: letters, digits, '-' and '.') or an "
                              "IPv4 address")
        if not slots.isdigit() or int(slots) < 1:
            raise ConfigError(f"{where}: slots={slots} must be a whole number >= 1 (the GPUs of that node)")
        if host in (h for h, _ in hosts):
            raise ConfigError(f"{where}: host {host!r} is listed twice; give each node one line")
        hosts.append((host, int(slots)))
    if not hosts:
        raise ConfigError(f"hostfile {hostfile!r} lists no host; write one 'host slots=N' line per node")
    return hosts


def hostfile_nodes(hostfile: str | None) -> int:
    """Nodes listed in a DeepSpeed hostfile (1 without one), which ``read_hostfile`` checks."""
    return len(read_hostfile(hostfile)) if hostfile else 1


def world_size_of(nproc: int, hostfile: str | None) -> int:
    from ..core.fields import Positive, check_flag  # pydantic: not on the way to --help

    check_flag("--nproc", nproc, Positive)
    return nproc * hostfile_nodes(hostfile)


def check_master_port(port: int | None) -> None:
    """``--master-port`` (None: the launcher picks a free one) is a TCP port number."""
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--master-port={port} is not a TCP port; use 1..65535 (or leave it out for a free one)")


@dataclass(frozen=True)
class NodeLaunch:
    """Start only this node's ranks of a multi-node run, without ssh (DeepSpeed's ``--no_ssh``).

    What a scheduler does on a cluster: the same ``launch()`` runs once per node, each with its
    ``node_rank``, all with the same hostfile, ``master_addr`` (node 0's address) and ``master_port``.
    ``prefix`` is a command the DeepSpeed runner is started under, e.g. ``("ip", "netns", "exec", NAME)``
    to run the node inside a network namespace (``dat-ds bench network``, the two-node test).
    """

    node_rank: int
    master_addr: str
    prefix: tuple[str, ...] = ()


def launch(module: str, argv: list[str], *, nproc: int, hostfile: str | None = None, master_port: int | None = None,
           env: dict[str, str] | None = None, checkpoint_root: str | Path | None = None,
           node: NodeLaunch | None = None, stop_signals: frozenset[int] = frozenset()) -> int:
    """Start ``python -m module argv`` on ``nproc`` ranks per node; returns 0 or raises ``RankFailure``.

    ``checkpoint_root``: a training run's checkpoint folder, named in the line ``Interrupted`` carries.
    ``node``: start only one node's ranks (needs ``hostfile`` and ``master_port``, the same on every node).
    ``stop_signals``: signals besides SIGTERM/SIGINT that stop the run too (``train.stop_signals``: SIGUSR1 ...);
    passed on as they are, since the ranks act on them (a final save), except to an ssh launch's remote
    hosts, which DeepSpeed's multi-node runner passes SIGTERM only (they get SIGTERM).
    """
    world_size_of(nproc, hostfile)
    if node is not None and (not hostfile or master_port is None):
        raise ConfigError("a per-node launch needs a hostfile and a master port that every node shares")
    from ..core import dist  # the accelerator (imports DeepSpeed: heavy, so only here)

    runner = runner_command(module, argv, nproc=nproc, master_port=master_port or free_port(), hostfile=hostfile,
                            node=node, acc=dist.accelerator(), environ=os.environ)
    cmd = list(runner.argv)
    log.debug("launching: %s", " ".join(cmd[1:]))
    child_env = {k: v for k, v in os.environ.items() if k not in runner.unset}
    child_env.update(dist.launch_env())
    child_env.update(env or {})
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env[GRACE_ENV] = str(STOP_GRACE_S)  # train.save_on_signal: a final save must fit before the SIGKILL
    passed = {s: signal.SIGTERM for s in FORWARDED_SIGNALS}  # what the run's process group gets for each
    ssh = bool(hostfile) and node is None
    passed.update({s: signal.SIGTERM if ssh else s for s in stop_signals if s not in passed})
    generic = "a rank failed (launcher exit code {rc}); see the output above"
    if hostfile and node is None:  # remote ranks cannot write into a local folder: the launcher's exit code is all
        rc = _run(cmd, child_env, checkpoint_root=checkpoint_root, all_local=False, passed=passed)
        if rc == EXIT_PEER_LOST:  # every rank that lost a peer printed its line (no report folder to read)
            raise _Quiet(rc)
        if rc != 0:
            raise RankFailure(generic.format(rc=rc), rc)
        return rc
    # The launcher stops every local rank when one exits non-zero; the ranks' exit reports name the culprit.
    # A node's ranks of a multi-node run are numbered node_rank * nproc + local rank (nproc on every node).
    first_rank = node.node_rank * nproc if node is not None else 0
    with tempfile.TemporaryDirectory(prefix="dat-ds-ranks-") as status_dir:
        child_env[STATUS_ENV] = status_dir
        child_env[CLI_PID_ENV] = str(os.getpid())  # local ranks only: a remote host has its own PIDs
        rc = _run(cmd, child_env, checkpoint_root=checkpoint_root, all_local=node is None, passed=passed)
        if rc != 0:
            line = failed_rank_line(status_dir, nproc, rc, first_rank=first_rank)
            if line is None and first_rank != 0:  # rank 0 printed the user error, on another node
                line = generic.format(rc=rc)
            # None: every rank reported the same user error (code 2/3), which rank 0 printed already.
            raise RankFailure(line, rc) if line is not None else _Quiet(rc)
    return rc


class Accelerator(Protocol):
    """What the launch command asks of DeepSpeed's accelerator (``get_accelerator()``; a fake in tests)."""

    def device_name(self) -> str: ...

    def device_count(self) -> int: ...

    def visible_devices_envs(self) -> list[str]: ...


@dataclass(frozen=True)
class RunnerCommand:
    """The DeepSpeed runner's command line, and the variables it must not inherit."""

    argv: tuple[str, ...]
    unset: tuple[str, ...] = ()


def runner_command(module: str, argv: list[str], *, nproc: int, master_port: int, hostfile: str | None = None,
                   node: NodeLaunch | None = None, acc: Accelerator, environ: Mapping[str, str]) -> RunnerCommand:
    """The command ``launch()`` runs (``deepspeed.launcher.runner``), built without starting anything."""
    devices, unset = device_flags(acc, environ, nproc, hostfile=hostfile, all_local=node is not None or not hostfile)
    cmd = [*(node.prefix if node else ()), sys.executable, "-m", "deepspeed.launcher.runner",
           "--master_port", str(master_port)]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if node is not None:
        cmd += ["--no_ssh", "--node_rank", str(node.node_rank), "--master_addr", node.master_addr]
    if environ.get("DAT_DS_VERBOSE", "") in ("", "0"):  # the launcher's INFO lines only with --verbose
        cmd += ["--log_level", "error"]
    cmd += [*devices, "--module", module, *argv]
    return RunnerCommand(tuple(cmd), unset)


def device_flags(acc: Accelerator, environ: Mapping[str, str], nproc: int, *, hostfile: str | None,
                 all_local: bool) -> tuple[list[str], tuple[str, ...]]:
    """The runner's flags that pick this node's devices, and the variables the runner must not see.

    DeepSpeed's runner honours the visible-devices variable (CUDA_VISIBLE_DEVICES) only without a hostfile and
    without --include/--exclude/--num_gpus/--num_nodes, and then starts a rank on every visible device; given
    --num_gpus N it deletes the variable, and launch.py sets it to 0..N-1 for the ranks: someone else's GPUs
    where the user (or SLURM) gave this job others. So the first N visible devices are named with
    ``--include localhost:IDS``, which the runner checks against the machine's devices, and the variable is
    not passed on (the runner would only say that it ignores it). The CPU accelerator has no devices to pick;
    an ssh launch's remote hosts have their own (``all_local`` False): both keep --num_gpus.
    """
    if acc.device_name() == "cpu" or not all_local:
        return ["--num_gpus", str(nproc)], ()
    name = acc.visible_devices_envs()[0]
    kind = f"{acc.device_name()} device(s)"
    if name not in environ:
        count = acc.device_count()
        if nproc > count:
            raise ConfigError(f"--nproc={nproc} but this node has {count} {kind}: lower --nproc to {count}")
        return ["--num_gpus", str(nproc)], ()
    ids = _visible_ids(name, environ[name])
    if nproc > len(ids):
        raise ConfigError(f"--nproc={nproc} but {name}={environ[name]!r} makes {len(ids)} {kind} visible: lower "
                          f"--nproc to {len(ids)} or make more devices visible")
    chosen = ids[:nproc]
    if not hostfile:
        return ["--include", "localhost:" + ",".join(map(str, chosen))], (name,)
    if chosen != list(range(nproc)):  # the runner takes a hostfile's slots as device numbers 0..slots-1
        raise ConfigError(f"{name}={environ[name]!r} cannot be honoured with --hostfile (DeepSpeed numbers every "
                          "node's devices from 0): start the ranks with srun, mpirun or torchrun "
                          "(README: On a cluster)")
    return ["--num_gpus", str(nproc)], ()


def _visible_ids(name: str, value: str) -> list[int]:
    entries = [e.strip() for e in value.split(",") if e.strip()]
    for e in entries:
        if not e.isdigit():  # a UUID (GPU-..., MIG-...): DeepSpeed's --include takes device numbers only
            raise ConfigError(f"{name}={value!r} names device {e!r} by other than its number, which DeepSpeed's "
                              f"launcher cannot select: list device numbers ({name}=4,5) or start the ranks with "
                              "torchrun or srun")
    return [int(e) for e in entries]


def _run(cmd: list[str], env: dict[str, str], *, checkpoint_root: str | Path | None, all_local: bool,
         passed: Mapping[int, int]) -> int:
    """Run the DeepSpeed launcher to its end; on a signal of ``passed`` stop all of the run, then raise
    ``Interrupted``.

    ``passed[signal]`` goes to the launcher's process group: DeepSpeed's runner, its per-node launcher and
    every local rank (the single-node runner dies on SIGTERM without passing it on; the multi-node one passes
    it to the remote hosts itself). SIGTERM/SIGINT go on as SIGTERM; SIGUSR1 (``train.stop_signals``) as
    itself: the runner and the per-node launcher die of it, the ranks stop after their final save. A second
    signal SIGKILLs the group.
    """
    received: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum, frame):
        received.append(signum)
        if proc is not None:
            _signal_run(proc, passed[signum] if len(received) == 1 else signal.SIGKILL)

    # Handlers only in the main thread (Python's rule); a launch from another thread keeps the defaults.
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in passed} if in_main else {}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        if received:  # a signal between installing the handlers and the launcher's start
            _signal_run(proc, passed[received[0]])
        rc = proc.wait()
        if received:
            _wait_for_run(proc)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        raise Interrupted(received[0], interrupted_line(checkpoint_root, remove_unfinished=all_local))
    return rc


def _signal_run(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group's id is the launcher's PID
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    import psutil  # a DeepSpeed dependency; here so that --help stays light

    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                members.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _wait_for_run(proc: subprocess.Popen) -> None:
    """Wait up to ``STOP_GRACE_S`` for every local process of the run to exit, then SIGKILL what is left."""
    deadline = time.monotonic() + STOP_GRACE_S
    while _group_members(proc.pid):
        if time.monotonic() > deadline:
            log.warning("the run did not stop within %.0f s of the signal; killing it", STOP_GRACE_S)
            _signal_run(proc, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5
            while _group_members(proc.pid) and time.monotonic() < kill_deadline:
                time.sleep(0.1)
            return
        time.sleep(0.2)


def interrupted_line(checkpoint_root: str | Path | None, *, remove_unfinished: bool) -> str:
    """``interrupted: last complete checkpoint <tag>; ...`` for a training run, ``interrupted`` otherwise.

    ``remove_unfinished``: every rank was local and is gone, so a save they left unfinished is deleted
    (never resumed from either way); remote ranks might still be writing theirs.
    """
    if checkpoint_root is None:
        return "interrupted"
    root = Path(checkpoint_root)
    from ..runtime.checkpoint import TMP_PREFIX, find_resume_tag  # torch: the ranks ran, so it is loaded anyway

    if remove_unfinished and root.is_dir():
        for d in root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(d, ignore_errors=True)
    tag = find_resume_tag(root, verify=False)  # committed tags; --resume auto verifies the files
    if tag is None:
        return "interrupted: no complete checkpoint yet; run the command again to start over"
    return f"interrupted: last complete checkpoint {tag}; continue with --resume auto"


class _Quiet(RankFailure):
    """Every rank failed alike and rank 0 printed the reason; exit with the ranks' code, say nothing more."""

    def __init__(self, code: int):
        super().__init__("", code)
