"""Who does what across ranks, in one place.

Device and backend always come from DeepSpeed's accelerator (CUDA+NCCL on GPUs, CPU+gloo here), so the
same code runs on both. Rank 0 logs and writes files; metrics are reduced before they are logged.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import closing

import torch
import torch.distributed as dist

_LOG_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    # The DeepSpeed launcher exports LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE.
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def is_main_process() -> bool:
    return rank() == 0


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def device() -> torch.device:
    acc = accelerator()
    name = acc.device_name()
    return torch.device(name if name == "cpu" else f"{name}:{local_rank()}")


def set_threads_per_rank() -> int:
    """Split the machine's cores evenly across the ranks on this node so they do not fight."""
    if os.environ.get("DAT_DS_THREADS_PER_RANK"):  # benchmarks pin this to compare world sizes fairly
        threads = int(os.environ["DAT_DS_THREADS_PER_RANK"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, local_world_size()))
    torch.set_num_threads(threads)
    return threads


def init_distributed(timeout_s: float = 120.0) -> None:
    """Initialise torch.distributed through DeepSpeed, also for a single process without a launcher."""
    import datetime

    import deepspeed

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python -m dat_ds.train` or in-process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    acc = accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank())
    deepspeed.init_distributed(
        dist_backend=acc.communication_backend_name(),
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _unlink_deepspeed_shm()


def _unlink_deepspeed_shm() -> None:
    """Drop the name of DeepSpeed's CPU shared-memory all-reduce buffer once every rank has mapped it.

    On the CPU accelerator DeepSpeed maps one ~70 MB ``/dev/shm`` segment per rank (named by uid,
    MASTER_ADDR, MASTER_PORT and rank) and never unlinks it, so every run leaks it until /dev/shm is
    full and later runs abort. After a barrier all ranks hold their mappings; unlinking the name frees
    the memory when the processes exit, as for any anonymous mapping.
    """
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    barrier()
    try:
        os.unlink(os.path.join(shm, name))
    except FileNotFoundError:  # not the CPU accelerator, or ranks on several nodes: nothing was created
        pass


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor of metrics over ranks (a no-op on one rank)."""
    if dist.is_initialized() and world_size() > 1:
        t = values.to(device(), torch.float64)
        dist.all_reduce(t)
        return t.cpu()
    return values


def all_gather_object(obj):
    if dist.is_initialized() and world_size() > 1:
        out = [None] * world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process() or record.levelno >= logging.ERROR or getattr(record, "all_ranks", False)


def setup_logging(level: int = logging.INFO) -> None:
    """Log dat_ds messages on rank 0 only (errors from every rank), through rich when on a terminal."""
    logger = logging.getLogger("dat_ds")
    if getattr(logger, "_dat_ds_configured", False):
        return
    import sys

    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # files and pipes get plain, greppable lines
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankZeroFilter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    logger._dat_ds_configured = True  # type: ignore[attr-defined]
    # DeepSpeed is chatty at INFO on every rank; keep its warnings.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- rank failure reports
# `dat-ds train --nproc N` sets DAT_DS_STATUS_DIR; every rank leaves rank<R>.json there when it exits
# (normally, by exception or by SIGTERM from the launcher). A rank that left nothing died hard (SIGKILL,
# OOM killer, segfault). The CLI turns that into one line naming the failed rank.
STATUS_ENV = "DAT_DS_STATUS_DIR"


def write_rank_status(code: int, error: BaseException | str | None = None) -> None:
    folder = os.environ.get(STATUS_ENV)
    if not folder:
        return
    import json
    import time

    r = int(os.environ.get("RANK", rank()))
    if isinstance(error, BaseException):
        comm = isinstance(error, getattr(dist, "DistBackendError", ())) or any(
            s in str(error) for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))
        text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    else:
        comm, text = False, error
    record = {"rank": r, "code": code, "error": text, "comm": comm, "time": time.time()}
    try:
        path = os.path.join(folder, f"rank{r}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


def install_sigterm_status() -> None:
    """Record a launcher's SIGTERM (a sibling failed) before exiting, so it is not blamed on this rank."""
    if not os.environ.get(STATUS_ENV):
        return
    import signal

    def handler(signum, frame):
        write_rank_status(128 + signum, "terminated by the launcher")
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def failed_rank_line(folder: str, nproc: int, launcher_rc: int) -> str | None:
    """One line naming the rank that failed first, or None when every rank reported a user error (code 2)."""
    import json
    import signal

    records = {}
    for r in range(nproc):
        try:
            with open(os.path.join(folder, f"rank{r}.json")) as f:
                records[r] = json.load(f)
        except (OSError, ValueError):
            pass
    silent = [r for r in range(nproc) if r not in records]
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
    failed = [rec for rec in records.values() if rec["code"] not in (0, 2) and rec["error"] != "terminated by the launcher"]
    if not failed:
        failed = [rec for rec in records.values() if rec["code"] != 0]
    if not failed:
        return None
    failed.sort(key=lambda rec: (rec.get("comm", False), rec["time"]))  # the cause, not its echo in a collective
    rec = failed[0]
    return f"rank {rec['rank']} failed (exit code {rec['code']}: {rec['error']}); the other ranks were stopped"
