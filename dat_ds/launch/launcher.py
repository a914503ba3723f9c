"""The one launcher: every multi-rank command starts its ranks through ``launch()``.

``launch(module, argv, nproc=N)`` runs ``python -m <module> <argv>`` on N ranks per node through the
DeepSpeed launcher (``--hostfile`` for several nodes), the same way users start DeepSpeed programs. Where
every rank it starts is local (one node, or one node's ranks of a multi-node run: ``NodeLaunch``) it gives
them a folder for their exit reports and, when the run fails, raises ``RankFailure`` with one line naming the
rank that failed first -- for a rank that lost contact with a peer, the line naming that peer, its node and
address, and the last checkpoint (exit code 4, ``core.dist.lost_contact``). Nothing here imports torch.

Signals: the launcher starts in its own session, so a terminal's Ctrl-C reaches this process only.
SIGTERM/SIGINT here are forwarded to the launcher's whole process group (the DeepSpeed launcher and
every rank), every process of the run is waited for with a bound (then SIGKILLed), and ``Interrupted``
is raised: exit code 128 + signal, one line naming the last complete checkpoint. The ranks also get this
process's PID (``DAT_DS_CLI_PID``) and exit within about a second once it is gone, so a SIGKILLed
``dat-ds`` leaves nothing running either (``status.watch_cli``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import EXIT_PEER_LOST, ConfigError
from ..core.ports import free_port
from ..core.stop import GRACE_ENV
from .status import CLI_PID_ENV, STATUS_ENV, failed_rank_line

log = logging.getLogger(__name__)

LAUNCH_FLAGS = ("--nproc", "--hostfile", "--master-port")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_S = 20.0  # after a forwarded signal: then SIGKILL, so nothing outlives the command by 30 s


class RankFailure(Exception):
    """A rank of a launched run failed; the others were stopped. Printed as one line."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.code = code


class Interrupted(Exception):
    """The user stopped a launched run with a signal; every process of it is gone. Printed as one line."""

    def __init__(self, signum: int, line: str):
        super().__init__(line)
        self.signum = signum
        self.code = 128 + signum  # what a shell reports for a process the signal ended: 143 TERM, 130 INT


def add_launch_args(p: argparse.ArgumentParser, default_nproc: int = 1) -> None:
    p.add_argument("--nproc", type=int, default=default_nproc, help=f"processes (ranks) per node (default {default_nproc})")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for several nodes ('host slots=N' lines)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")


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


def hostfile_nodes(hostfile: str | None) -> int:
    """Nodes listed in a DeepSpeed hostfile (1 without one)."""
    if not hostfile:
        return 1
    if not Path(hostfile).is_file():
        raise ConfigError(f"hostfile {hostfile!r} not found; write one 'host slots=N' line per node")
    lines = [ln.split("#", 1)[0].strip() for ln in Path(hostfile).read_text().splitlines()]
    return max(1, sum(1 for ln in lines if ln))


def world_size_of(nproc: int, hostfile: str | None) -> int:
    if nproc < 1:
        raise ConfigError(f"--nproc={nproc} must be >= 1")
    return nproc * hostfile_nodes(hostfile)


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
           node: NodeLaunch | None = None) -> int:
    """Start ``python -m module argv`` on ``nproc`` ranks per node; returns 0 or raises ``RankFailure``.

    ``checkpoint_root``: a training run's checkpoint folder, named in the line ``Interrupted`` carries.
    ``node``: start only one node's ranks (needs ``hostfile`` and ``master_port``, the same on every node).
    """
    world_size_of(nproc, hostfile)
    if node is not None and (not hostfile or master_port is None):
        raise ConfigError("a per-node launch needs a hostfile and a master port that every node shares")
    cmd = [*(node.prefix if node else ()), sys.executable, "-m", "deepspeed.launcher.runner",
           "--master_port", str(master_port or free_port())]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if node is not None:
        cmd += ["--no_ssh", "--node_rank", str(node.node_rank), "--master_addr", node.master_addr]
    if os.environ.get("DAT_DS_VERBOSE", "") in ("", "0"):  # the launcher's INFO lines only with --verbose
        cmd += ["--log_level", "error"]
    cmd += ["--num_gpus", str(nproc), "--module", module, *argv]
    log.debug("launching: %s", " ".join(cmd[1:]))
    from ..core import dist  # the accelerator's name for the ranks (imports DeepSpeed: heavy, so only here)

    child_env = dict(os.environ)
    child_env.update(dist.launch_env())
    child_env.update(env or {})
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env[GRACE_ENV] = str(STOP_GRACE_S)  # train.save_on_signal: a final save must fit before the SIGKILL
    generic = "a rank failed (launcher exit code {rc}); see the output above"
    if hostfile and node is None:  # remote ranks cannot write into a local folder: the launcher's exit code is all
        rc = _run(cmd, child_env, checkpoint_root=checkpoint_root, all_local=False)
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
        rc = _run(cmd, child_env, checkpoint_root=checkpoint_root, all_local=node is None)
        if rc != 0:
            line = failed_rank_line(status_dir, nproc, rc, first_rank=first_rank)
            if line is None and first_rank != 0:  # rank 0 printed the user error, on another node
                line = generic.format(rc=rc)
            # None: every rank reported the same user error (code 2/3), which rank 0 printed already.
            raise RankFailure(line, rc) if line is not None else _Quiet(rc)
    return rc


def _run(cmd: list[str], env: dict[str, str], *, checkpoint_root: str | Path | None, all_local: bool) -> int:
    """Run the DeepSpeed launcher to its end; on SIGTERM/SIGINT stop all of the run, then raise ``Interrupted``.

    The signal goes to the launcher's process group: DeepSpeed's runner, its per-node launcher and every
    local rank (the single-node runner dies on SIGTERM without passing it on; the multi-node one passes it
    to the remote hosts itself). A second signal SIGKILLs the group.
    """
    received: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum, frame):
        received.append(signum)
        if proc is not None:
            _signal_run(proc, signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    # Handlers only in the main thread (Python's rule); a launch from another thread keeps the defaults.
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS} if in_main else {}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        if received:  # a signal between installing the handlers and the launcher's start
            _signal_run(proc, signal.SIGTERM)
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
