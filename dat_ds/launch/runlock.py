"""One run, one writer: the lock on a run folder.

The owner is the run's **rank 0**: the process that writes the run folder, whichever way the run was
started (``dat-ds train/demo/pretrain`` in-process with one rank, ranks started by ``--nproc N`` or a
hostfile, or ``deepspeed --module dat_ds.train``). It creates ``<output_dir>/<name>.lock`` (a sibling of
the run folder, so ``--overwrite`` can move the old folder aside without moving the lock) with
``O_CREAT | O_EXCL`` before it writes anything, and removes it when the run ends, also on an exception
or a signal Python handles (SIGINT). The file says who holds the folder: host, PID, start time and
command line. ``dat-ds train --nproc N`` also checks it before starting any rank (``check_free``).

A second run on the same folder is refused in one line naming the holder. A lock left by a process of
this host that is gone (SIGKILL, OOM killer, a rank stopped by the launcher) is stale: it is taken over
with a WARNING. A lock from another host cannot be checked from here: it is refused, and the line says
to delete the file if that job is really gone. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["RunLock", "acquire", "check_free", "clear_dead", "holder", "lock_path"]

SUFFIX = ".lock"
TRAIN_FIX = "start this one with another --name"  # how the refused command can go ahead anyway
EVAL_FIX = "write this evaluation elsewhere with --out DIR"


def lock_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + SUFFIX)


def _host() -> str:
    return socket.gethostname()


def _since(record: dict[str, Any]) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["started"])))
    except (KeyError, TypeError, ValueError):
        return "an unknown time"


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The lock's record, None when the folder is not locked, ``{}`` when the file cannot be read as one."""
    try:
        text = lock_path(run_dir).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
        int(record["pid"]), str(record["host"])
        return record
    except (ValueError, KeyError, TypeError):
        return {}


def _pid_alive(pid: int, started: float | None) -> bool:
    """The process ``pid`` of this host runs, and is not a newer process that reuses a dead holder's PID."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    if started is None:
        return True
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped (e.g. its parent, the launcher, is gone too)
            return False
        return proc.create_time() <= started + 1.0
    except ImportError:  # pragma: no cover - DeepSpeed depends on psutil
        return True
    except Exception:  # noqa: BLE001 - the process went away between the two checks
        return False


def _is_stale(record: dict[str, Any]) -> bool:
    started = record.get("started")
    return record.get("host") == _host() and not _pid_alive(int(record["pid"]), float(started) if started else None)


def _refusal(run_dir: Path, record: dict[str, Any], fix: str = TRAIN_FIX) -> str:
    path = lock_path(run_dir)
    if not record:
        return (f"run folder {str(run_dir)!r} has an unreadable lock file {str(path)!r}; if no run is using the "
                "folder, delete that file and start again")
    who = f"PID {record['pid']} on host {record['host']!r} since {_since(record)}"
    if record["host"] == _host():
        return (f"run folder {str(run_dir)!r} is in use by {who}; wait for that run to finish or stop it "
                f"(kill {record['pid']}), or {fix}")
    return (f"run folder {str(run_dir)!r} is in use by {who}; if that job is really gone, delete {str(path)!r} "
            f"and start again, or {fix}")


def check_free(run_dir: Path, fix: str = TRAIN_FIX) -> None:
    """Read-only: raise the one-line ConfigError if a live run (or another host's) holds ``run_dir``."""
    record = holder(run_dir)
    if record is not None and (not record or not _is_stale(record)):
        raise ConfigError(_refusal(run_dir, record, fix))


class RunLock:
    """The lock this process holds on a run folder; ``release()`` (or leaving the ``with`` block) removes it."""

    def __init__(self, run_dir: Path, record: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.path = lock_path(run_dir)
        self.record = record

    def release(self) -> None:
        """Remove the lock file if it is still this process's (never another run's that took over)."""
        current = holder(self.run_dir)
        if current and current.get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file atomically (O_CREAT | O_EXCL); False if it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(run_dir: Path, stale: dict[str, Any]) -> bool:
    """Move the stale lock out of the way; False if another process replaced it meanwhile (then it is put back)."""
    path = lock_path(run_dir)
    private = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, private)
    except FileNotFoundError:  # someone else removed it first: try to create ours
        return True
    try:
        moved = json.loads(private.read_text())
    except (OSError, ValueError):
        moved = {}
    if moved.get("token") != stale.get("token"):  # we moved a fresh lock of a run that took over before us
        try:
            os.link(private, path)  # put it back unless yet another lock exists
        except OSError:
            pass
        private.unlink(missing_ok=True)
        return False
    private.unlink(missing_ok=True)
    log.warning("taking over the lock of run folder %s: PID %s (on this host since %s) is gone", run_dir,
                stale["pid"], _since(stale))
    return True


def acquire(run_dir: Path, fix: str = TRAIN_FIX) -> RunLock:
    """Lock ``run_dir`` for this process, taking over a stale lock; raise the one-line ConfigError if held.
    ``fix``: the refusal's last words, how the refused command can go ahead (another --name, --out)."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    record = {"host": _host(), "pid": os.getpid(), "started": time.time(), "command": " ".join(sys.argv),
              "token": uuid.uuid4().hex}
    record["started_at"] = _since(record)
    for _ in range(5):  # a stale lock taken over by someone else in between: look again
        if _create(lock_path(run_dir), record):
            log.debug("locked run folder %s (%s)", run_dir, lock_path(run_dir))
            return RunLock(run_dir, record)
        current = holder(run_dir)
        if current is None:  # released in between
            continue
        if not current or not _is_stale(current):
            raise ConfigError(_refusal(run_dir, current, fix))
        _take_over(run_dir, current)
    raise ConfigError(_refusal(run_dir, holder(run_dir) or {}, fix))


def clear_dead(run_dir: Path, since: float) -> int | None:
    """After a failed launch on this host: remove the lock of a rank 0 started since ``since`` that is gone
    (killed, or stopped by the launcher without running Python's cleanup); returns its PID, else None."""
    record = holder(run_dir)
    if not record or float(record.get("started") or 0) < since or not _is_stale(record):
        return None
    path = lock_path(run_dir)
    if holder(run_dir) == record:
        path.unlink(missing_ok=True)
    return int(record["pid"])
