"""The one launcher: every multi-rank command starts its ranks through ``launch()``.

``launch(module, argv, nproc=N)`` runs ``python -m <module> <argv>`` on N ranks per node through the
DeepSpeed launcher (``--hostfile`` for several nodes), the same way users start DeepSpeed programs. On
one node it gives the ranks a folder for their exit reports and, when the run fails, raises
``RankFailure`` with one line naming the rank that failed first. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..core.errors import ConfigError
from ..core.ports import free_port
from .status import STATUS_ENV, failed_rank_line

log = logging.getLogger(__name__)

LAUNCH_FLAGS = ("--nproc", "--hostfile", "--master-port")


class RankFailure(Exception):
    """A rank of a launched run failed; the others were stopped. Printed as one line."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.code = code


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


def launch(module: str, argv: list[str], *, nproc: int, hostfile: str | None = None, master_port: int | None = None,
           env: dict[str, str] | None = None) -> int:
    """Start ``python -m module argv`` on ``nproc`` ranks per node; returns 0 or raises ``RankFailure``."""
    world_size_of(nproc, hostfile)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(master_port or free_port())]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if os.environ.get("DAT_DS_VERBOSE", "") in ("", "0"):  # the launcher's INFO lines only with --verbose
        cmd += ["--log_level", "error"]
    cmd += ["--num_gpus", str(nproc), "--module", module, *argv]
    log.debug("launching: %s", " ".join(cmd[1:]))
    from ..core import dist  # the accelerator's name for the ranks (imports DeepSpeed: heavy, so only here)

    child_env = dict(os.environ)
    child_env.update(dist.launch_env())
    child_env.update(env or {})
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    if hostfile:  # remote ranks cannot write into a local folder: the launcher's exit code is all we get
        rc = subprocess.call(cmd, env=child_env)
        if rc != 0:
            raise RankFailure(f"a rank failed (launcher exit code {rc}); see the output above", rc)
        return rc
    # The launcher stops every rank when one exits non-zero; the ranks' exit reports name the culprit.
    with tempfile.TemporaryDirectory(prefix="dat-ds-ranks-") as status_dir:
        child_env[STATUS_ENV] = status_dir
        rc = subprocess.call(cmd, env=child_env)
        if rc != 0:
            line = failed_rank_line(status_dir, nproc, rc)
            # None: every rank reported the same user error (code 2/3), which rank 0 printed already.
            raise RankFailure(line, rc) if line is not None else _Quiet(rc)
    return rc


class _Quiet(RankFailure):
    """Every rank failed alike and rank 0 printed the reason; exit with the ranks' code, say nothing more."""

    def __init__(self, code: int):
        super().__init__("", code)
