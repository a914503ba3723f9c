"""Rank exit reports: which rank failed first, and why, in one line.

``launch()`` sets ``DAT_DS_STATUS_DIR`` for the ranks it starts; every rank leaves ``rank<R>.json`` there
when it exits (normally, by exception, or by SIGTERM from the launcher). A rank that left nothing died
hard (SIGKILL, OOM killer, segfault). ``failed_rank_line`` turns the reports into one line naming the
rank that failed first; a rank that lost contact with a peer (``PeerLostError``) left that whole line, and it
is used as it is. ``watch_cli`` ends a rank whose ``dat-ds`` command is gone (``DAT_DS_CLI_PID``).
Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from ..core.errors import PeerLostError

log = logging.getLogger(__name__)

STATUS_ENV = "DAT_DS_STATUS_DIR"
CLI_PID_ENV = "DAT_DS_CLI_PID"  # the dat-ds process that launched this rank
CLI_POLL_S = 1.0
TERMINATED = "terminated by the launcher"
CLI_GONE = "the dat-ds command that started this run is gone"
_COMM_HINTS = ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _is_comm_error(error: BaseException) -> bool:
    """A collective that failed because a peer went away: an echo of another rank's failure."""
    try:
        import torch.distributed as tdist

        if isinstance(error, getattr(tdist, "DistBackendError", ())):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return any(s in str(error) for s in _COMM_HINTS)


def write_rank_status(code: int, error: BaseException | str | None = None) -> None:
    folder = os.environ.get(STATUS_ENV)
    if not folder:
        return
    if isinstance(error, BaseException):
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        comm, text = _is_comm_error(error), f"{type(error).__name__}: {first}"
    else:
        comm, text = False, error
    r = _rank()
    record = {"rank": r, "code": code, "error": text, "comm": comm, "time": time.time()}
    if isinstance(error, PeerLostError):  # the cause is elsewhere (a peer, the network): an echo with a full line
        record.update(comm=True, line=str(error))
    try:
        path = os.path.join(folder, f"rank{r}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


def install_signal_status(signals: Iterable[int] = (signal.SIGTERM,)) -> None:
    """Record a launcher's SIGTERM (a sibling failed, or the user's signal) before exiting, so it is not
    blamed on this rank; the run entry installs it for SIGTERM, ``launch.train`` for the run's
    ``train.stop_signals`` too (SIGUSR1 ...), which ``launch()`` passes on as they are. While a trainer defers
    the signal (``train.save_on_signal``, ``core.stop``) the handler only records it: the trainer stops at the
    end of the step, and every rank exits together."""
    if not os.environ.get(STATUS_ENV):
        return
    from ..core import stop

    def handler(signum, frame):
        if stop.deferred(signum):
            stop.record(signum)
            return
        write_rank_status(128 + signum, TERMINATED)
        os._exit(128 + signum)

    for s in signals:
        signal.signal(s, handler)


def watch_cli() -> threading.Thread | None:
    """In a rank ``launch()`` started: exit (code 143) within ~1 s of the launching ``dat-ds`` process's end.

    A SIGKILLed ``dat-ds`` cannot stop its run, and DeepSpeed's launcher does not notice that its parent
    is gone; without this the ranks would train on, re-parented, to the end.
    """
    pid = os.environ.get(CLI_PID_ENV)
    if not pid:
        return None
    import psutil  # a DeepSpeed dependency

    born = _started(pid)  # the start tells the launching process from a later one that got its PID

    def alive() -> bool:
        if born is None:
            return False
        try:
            return _started(pid) == born and psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch() -> None:
        while alive():
            time.sleep(CLI_POLL_S)
        log.error("%s (PID %s); stopping rank %d", CLI_GONE, pid, _rank())
        write_rank_status(128 + signal.SIGTERM, CLI_GONE)
        os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=watch, name="dat-ds-cli-watch", daemon=True)
    thread.start()
    return thread


def _started(pid: str) -> float | None:
    """When process ``pid`` started, None if it is gone: on Linux its start in clock ticks since boot
    (``/proc/PID/stat``), which a wall-clock step leaves alone; psutil's ``create_time`` (boot time read from the
    wall clock, plus those ticks) moved under a clock step and both ranks of a live run took their command for gone."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return float(stat[stat.rindex(")") + 2:].split()[19])  # field 22: after "pid (comm) state ..."
    except (OSError, ValueError, IndexError):
        pass
    import psutil

    try:
        return psutil.Process(int(pid)).create_time()
    except (psutil.Error, ValueError):
        return None


def failed_rank_line(folder: str, nproc: int, launcher_rc: int, first_rank: int = 0) -> str | None:
    """One line naming the rank that failed first, or None when every rank reported a user error (code 2).

    ``first_rank``: the global rank of the first of the ``nproc`` ranks that reported here (one node's ranks)."""
    ranks = range(first_rank, first_rank + nproc)
    records = {}
    for r in ranks:
        try:
            with open(os.path.join(folder, f"rank{r}.json")) as f:
                records[r] = json.load(f)
        except (OSError, ValueError):
            pass
    silent = [r for r in ranks if r not in records]
    if not silent and all(rec["code"] in (2, 3) for rec in records.values()):
        return None  # a config/data error or a NaN abort that every rank agreed on: rank 0 printed its line
    if silent:
        r = silent[0]
        if launcher_rc > 128:  # the launcher exits with the child's negative return code, mod 256
            sig = 256 - launcher_rc
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            return f"rank {r} failed (exit code -{sig}: killed by {name}); the other ranks were stopped"
        return f"rank {r} failed (exited without a report; launcher exit code {launcher_rc}); the other ranks were stopped"
    # A user error one rank alone met (code 2: e.g. a corrupt image in its shard) is a cause too, not an echo.
    failed = [rec for rec in records.values() if rec["code"] != 0 and rec["error"] != TERMINATED]
    if not failed:
        failed = [rec for rec in records.values() if rec["code"] != 0]
    if not failed:
        return None
    # The cause, not its echo in a collective; among echoes, one that names the peer it lost.
    failed.sort(key=lambda rec: (rec.get("comm", False), "line" not in rec, rec["time"]))
    rec = failed[0]
    if rec.get("line"):
        return rec["line"]
    return f"rank {rec['rank']} failed (exit code {rec['code']}: {rec['error']}); the other ranks were stopped"
