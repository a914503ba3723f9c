"""Where a result came from: versions, the code's git commit, the command and the machines (``summary.json``,
``eval.json``, checkpoints). Reads installed metadata: importing this imports no torch."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

COMMAND_ENV = "DAT_DS_COMMAND"  # the user's dat-ds command line, set by the CLI for the ranks it starts
_PACKAGES = ("dat-ds", "torch", "deepspeed", "timm", "torchvision")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(root: Path | None = None) -> dict[str, Any] | None:
    """The checkout's commit and whether tracked files differ from it; None for an installed wheel."""
    root = root or Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def command_line() -> str:
    """The command the user typed (the CLI's, handed to its ranks), else this process's own."""
    return os.environ.get(COMMAND_ENV) or shlex.join([Path(sys.executable).name, *sys.argv])


def provenance(*, world_size: int, hosts: list[str]) -> dict[str, Any]:
    torch = sys.modules.get("torch")
    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES},
                     "cuda": getattr(getattr(torch, "version", None), "cuda", None)},
        "git": git_commit(), "command": command_line(), "world_size": world_size, "hosts": hosts,
    }
