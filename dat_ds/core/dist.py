"""Who does what across ranks, in one place.

Device and backend always come from DeepSpeed's accelerator (CUDA+NCCL on GPUs, CPU+gloo here), so the
same code runs on both. Rank 0 logs and writes files; metrics are reduced before they are logged.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from .ports import free_port

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
