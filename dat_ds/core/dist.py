"""Who does what across ranks, in one place.

Device and backend always come from DeepSpeed's accelerator (CUDA+NCCL on GPUs, CPU+gloo here), so the
same code runs on both. Rank 0 logs and writes files; metrics are reduced before they are logged.
Importing this module imports no torch (the CLI logs through it before deciding it needs torch): the
rank helpers read torch.distributed only once something else has imported it.

Every collective waits at most ``timeout_s`` (the run config's ``dist.timeout_s``) for its peers. When one
fails because a peer stopped answering, ``lost_contact`` tells which: each rank still in contact checks in
at the rendezvous store (on the master's node) and waits a few seconds for the others; those that never
come are the lost ones, named by rank, node and address (gathered once at start-up). A rank that cannot
reach the store itself names the master.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import DistConfig
from .ports import free_port

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
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


DEFAULT_TIMEOUT_S = DistConfig.timeout_s  # the run config's default (NCCL's own); gloo's 30 min hides a dead link
_CHECKIN_KEY = "dat_ds/lost_contact/alive/"  # + rank: "I am still here" after a failed collective
# Messages of a collective that failed because a peer stopped answering or went away (gloo, NCCL, the store).
_LOST_HINTS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe",
               "no route to host", "network is unreachable", "read error", "write error")


@dataclass(frozen=True)
class Peer:
    """Where a rank runs: what ``lost_contact`` says about a rank that stopped answering."""

    rank: int
    node: int | None  # the launcher's node rank (DeepSpeed: CROSS_RANK, torchrun: GROUP_RANK)
    addr: str  # this rank's address on the route to the master

    def describe(self) -> str:
        where = ", ".join([*([f"node {self.node}"] if self.node is not None else []), self.addr])
        return f"rank {self.rank} ({where})"


@dataclass
class _World:
    timeout_s: float = DEFAULT_TIMEOUT_S
    peers: tuple[Peer, ...] = ()  # every rank's Peer, by rank (empty in a world of one)


_world = _World()  # set once by init_distributed: this process belongs to one world


def _node_rank() -> int | None:
    for key in ("CROSS_RANK", "GROUP_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def _address_towards(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (connecting a UDP socket sends nothing)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise torch.distributed through DeepSpeed, also for a single process without a launcher.

    ``timeout_s``: how long any collective waits for its peers (``dist.timeout_s``). In a world of several
    ranks, every rank's node and address are gathered once, for ``lost_contact``.
    """
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
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed builds its own groups (a clone of the world, the data-parallel groups: the gradient all-reduce)
    # with new_group(ranks), which takes torch's default timeout (30 min for gloo), not the world's: without
    # this a dead link would stall training for half an hour. One world per process, so the default is ours.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if distributed_c10d.default_pg_nccl_timeout is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), timeout=timeout)
    _world.timeout_s = timeout_s
    if world_size() > 1:
        me = Peer(rank(), _node_rank(), _address_towards(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        _world.peers = tuple(all_gather_object(me))


def lost_contact(error: BaseException, during: str) -> str | None:
    """After a collective raised ``error``: ``"rank R (node N, ADDR) lost contact <during>: <cause>"`` naming
    the peers that stopped answering, or None when ``error`` is not that (or every rank is still there).

    Every rank that saw its collective fail calls this: it checks in at the rendezvous store and waits up to
    a quarter of the timeout (3-10 s) for the other ranks to do the same; the lost ones never come. A rank
    that cannot reach the store (its own link is down) names the master instead. Bounded: at most that wait.
    """
    world = world_size() if _world.peers else 0
    if world <= 1 or not _is_lost_peer_error(error):
        return None
    wait_s = min(10.0, max(3.0, _world.timeout_s / 4))
    me, host, port = rank(), os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", "0") or 0)
    seen = _check_in(me, world, host, port, wait_s)
    cause = _short_cause(error)
    if seen is None:  # the store is on the master's node: that is the peer this rank lost
        if me == 0:
            return None  # the store lives in this very process: something else is wrong
        lost = [0]
        cause += f", and the master's store at {host}:{port} does not answer either"
    else:
        lost = [r for r in range(world) if r not in seen]
        if not lost:
            return None
    named = [_world.peers[r].describe() for r in lost[:3]]
    who = ", ".join(named) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
    return f"{who} lost contact {during}: {cause}"


def _is_lost_peer_error(error: BaseException) -> bool:
    """A collective (or the store) that timed out or lost its connection; not any error that mentions a timeout."""
    low = str(error).lower()
    tdist = sys.modules.get("torch.distributed")
    distributed = (isinstance(error, getattr(tdist, "DistError", ())) if tdist is not None else False) or any(
        m in low for m in ("gloo", "nccl", "tcpstore", "process group"))
    return distributed and any(h in low for h in _LOST_HINTS)


def _check_in(me: int, world: int, host: str, port: int, wait_s: float) -> set[int] | None:
    """Ranks that checked in at the store within ``wait_s`` (this one included); None: the store is unreachable."""
    import datetime

    import torch.distributed as tdist

    deadline = time.monotonic() + wait_s
    if not _reachable(host, port, deadline):  # first in Python: torch's failed connect logs a C++ stack trace
        log.debug("lost contact: the store at %s:%d is unreachable", host, port)
        return None
    try:
        store = tdist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=wait_s),
                               wait_for_workers=False)
        store.set(f"{_CHECKIN_KEY}{me}", "1")
    except Exception as e:  # noqa: BLE001 - any failure to reach the store means the same here
        log.debug("lost contact: the store at %s:%d is unreachable: %s", host, port, e)
        return None
    seen = {me}
    while len(seen) < world and time.monotonic() < deadline:
        try:
            seen |= {r for r in range(world) if r not in seen and store.check([f"{_CHECKIN_KEY}{r}"])}
        except Exception:  # noqa: BLE001 - the store went away meanwhile: what we saw is what we know
            break
        time.sleep(0.2)
    return seen


def _reachable(host: str, port: int, deadline: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens before ``deadline`` (retried: the store may be busy)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            with socket.create_connection((host, port), timeout=min(left, 2.0)):
                return True
        except OSError:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _short_cause(error: BaseException) -> str:
    text = str(error).strip()
    low = text.lower()
    backend = accelerator().communication_backend_name()
    if "timed out" in low or "timeout" in low:
        return f"no reply within {_world.timeout_s:g} s ({backend}; dist.timeout_s)"
    if "closed by peer" in low or "reset by peer" in low or "broken pipe" in low:
        return f"its connection closed ({backend}): its process ended or its node went down"
    first = text.splitlines()[0] if text else type(error).__name__
    return first if len(first) <= 160 else first[:157] + "..."


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
    launcher and every rank skip the detection and its notice; torch's C++ log shows errors only
    (``TORCH_CPP_LOG_LEVEL``: c10d's socket notices, e.g. "the hostname of the client socket cannot be
    retrieved" between two network namespaces). With --verbose, or where the user set them, nothing is set.
    """
    if verbose():
        return {}
    env = {} if "TORCH_CPP_LOG_LEVEL" in os.environ else {"TORCH_CPP_LOG_LEVEL": "ERROR"}
    if "DS_ACCELERATOR" not in os.environ:
        acc = accelerator()
        env["DS_ACCELERATOR"] = str(getattr(acc, "_name", None) or acc.device_name())
    return env


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
