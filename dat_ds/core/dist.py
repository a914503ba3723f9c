"""Who does what across ranks, in one place.

Device and backend always come from DeepSpeed's accelerator (CUDA+NCCL on GPUs, CPU+gloo here), so the
same code runs on both. Rank 0 logs and writes files; metrics are reduced before they are logged.
Importing this module imports no torch (the CLI logs through it before deciding it needs torch): the
rank helpers read torch.distributed only once something else has imported it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from .ports import free_port

if TYPE_CHECKING:
    import torch

_LOG_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
# Loggers of libraries that talk at INFO on every rank during start-up; quiet unless --verbose.
_CHATTY = ("DeepSpeed", "torch.distributed")


def _tdist():
    """torch.distributed if it is initialised in this process, else None (never imports torch)."""
    tdist = sys.modules.get("torch.distributed")
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        return tdist
    return None


def rank() -> int:
    tdist = _tdist()
    return tdist.get_rank() if tdist is not None else int(os.environ.get("RANK", 0))


def world_size() -> int:
    tdist = _tdist()
    return tdist.get_world_size() if tdist is not None else int(os.environ.get("WORLD_SIZE", 1))


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
    import torch

    acc = accelerator()
    name = acc.device_name()
    return torch.device(name if name == "cpu" else f"{name}:{local_rank()}")


def set_threads_per_rank() -> int:
    """Split the machine's cores evenly across the ranks on this node so they do not fight."""
    import torch

    if os.environ.get("DAT_DS_THREADS_PER_RANK"):  # benchmarks pin this to compare world sizes fairly
        threads = int(os.environ["DAT_DS_THREADS_PER_RANK"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, local_world_size()))
    torch.set_num_threads(threads)
    return threads


def _skip_cpu_shm_op(acc) -> None:
    """On the CPU accelerator, tell DeepSpeed its shared-memory comm op is unavailable.

    DeepSpeed's TorchBackend builds that op at start-up (a ~50 s JIT compile on a fresh machine, then a
    ~70 MB /dev/shm segment per rank that is never unlinked), yet only ``inference_all_reduce`` uses
    it; training all-reduces through gloo. ``deepspeed.ops.__compatible_ops__`` is the cached table
    DeepSpeed consults before building an op, so marking the op incompatible there skips both.
    """
    if acc.device_name() != "cpu":
        return
    import deepspeed.ops

    builder = acc.create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def init_distributed(timeout_s: float = 120.0) -> None:
    """Initialise torch.distributed through DeepSpeed, also for a single process without a launcher."""
    import datetime

    import deepspeed
    import torch.distributed as tdist

    if tdist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python -m dat_ds.train` or in-process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    acc = accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank())
    _skip_cpu_shm_op(acc)
    deepspeed.init_distributed(
        dist_backend=acc.communication_backend_name(),
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def barrier() -> None:
    tdist = _tdist()
    if tdist is not None and world_size() > 1:
        tdist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor of metrics over ranks (a no-op on one rank)."""
    tdist = _tdist()
    if tdist is not None and world_size() > 1:
        import torch

        t = values.to(device(), torch.float64)
        tdist.all_reduce(t)
        return t.cpu()
    return values


def all_gather_object(obj):
    tdist = _tdist()
    if tdist is not None and world_size() > 1:
        out = [None] * world_size()
        tdist.all_gather_object(out, obj)
        return out
    return [obj]


# DeepSpeed's start-up notices that say nothing the run line does not (DeepSpeed logs them as warnings).
_STARTUP_NOISE = ("Setting accelerator to CPU", "Setting ds_accelerator to")


class _StartupNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_STARTUP_NOISE)


def launch_env() -> dict[str, str]:
    """Environment for the ranks ``launch()`` starts: quiet unless ``--verbose``.

    The accelerator DeepSpeed chose in this process is handed down (``DS_ACCELERATOR``), so the
    launcher and every rank skip the detection and its notice; with --verbose nothing is set.
    """
    if verbose() or "DS_ACCELERATOR" in os.environ:
        return {}
    acc = accelerator()
    return {"DS_ACCELERATOR": str(getattr(acc, "_name", None) or acc.device_name())}


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process() or record.levelno >= logging.ERROR or getattr(record, "all_ranks", False)


def verbose() -> bool:
    """``-v/--verbose`` (or DAT_DS_VERBOSE=1, which the CLI sets for the ranks it starts)."""
    return os.environ.get("DAT_DS_VERBOSE", "") not in ("", "0")


def setup_logging(level: int = logging.INFO) -> None:
    """Log dat_ds messages on rank 0 only (errors from every rank), through rich when on a terminal."""
    logger = logging.getLogger("dat_ds")
    if getattr(logger, "_dat_ds_configured", False):
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # files and pipes get plain, greppable lines
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankZeroFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose() else level)
    logger.propagate = False
    logger._dat_ds_configured = True  # type: ignore[attr-defined]
    # DeepSpeed is chatty at INFO on every rank (accelerator choice, launcher lines); keep its warnings,
    # and its start-up notices only with --verbose.
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose() else logging.WARNING)
    if not verbose():  # a filter outlives DeepSpeed's own logger set-up, which runs when it is first imported
        logging.getLogger("DeepSpeed").addFilter(_StartupNoiseFilter())
