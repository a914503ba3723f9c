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

Every way people start ranks forms one world: torchrun and the DeepSpeed launcher export torch's variables
(``RANK`` ...) themselves; ``srun`` and ``mpirun``/``mpiexec`` export their own, which ``cluster_env`` maps
to torch's (``adopt_cluster_env`` exports them, before anything reads the rank).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError
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
    return torch.device(name if name == "cpu" else f"{name}:{_device_index(acc)}")


def _device_index(acc) -> int:
    """This rank's device among those it sees: where each rank sees only its own GPU (SLURM's
    --gpus-per-task, CUDA_VISIBLE_DEVICES set per task) that is device 0, whatever its local rank."""
    return local_rank() % max(1, acc.device_count())


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


DEFAULT_TIMEOUT_S = 600.0  # dist.timeout_s's default (NCCL's own); gloo's 30 min hides a dead link
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
    host: str = ""  # its host name (summary.json's hosts)

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


# The world srun or mpirun/mpiexec started, from their own variables. torchrun and the DeepSpeed launcher
# export torch's (RANK ...) themselves; these launchers do not, and without this every process they start
# would train alone as a world of one.

_PORT_BASE, _PORT_SPAN = 20000, 12000  # derived rendezvous ports: unprivileged, below Linux's ephemeral 32768+
# Variables every rank of one MPI job shares, on every node: Open MPI 4 exports all of the first three, Open MPI 5
# and PMIx-based MPICH the first; under a scheduler, its job id.
_MPI_JOB_KEYS = ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_hnp_uri", "SLURM_JOB_ID", "PBS_JOBID")
_SET_BY_SRUN = ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")  # not in a batch script's own environment
_SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")  # the step's first: rank 0's


@dataclass(frozen=True)
class ClusterEnv:
    """The world a scheduler or MPI launcher started, as torch.distributed's variables (``variables()``)."""

    launcher: str  # "SLURM", "Open MPI", "MPICH/Intel MPI": said once in the log
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def variables(self) -> dict[str, str]:
        local = str(self.local_world_size)
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": local, "LOCAL_SIZE": local,  # torchrun's name, DeepSpeed's name
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}

    def describe(self) -> str:
        return (f"{self.launcher}: rank {self.rank} of {self.world_size}, local {self.local_rank} of "
                f"{self.local_world_size}, master {self.master_addr}:{self.master_port}")


@dataclass(frozen=True)
class _Ranks:
    """What a launcher's variables say about this process, and what its rendezvous can be derived from."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    job_key: str | None  # the same on every rank of this job, and on no other job's: the port is derived from it
    master_host: str | None = None  # rank 0's host, where the launcher names it (SLURM's node list)


def cluster_env(environ: Mapping[str, str]) -> ClusterEnv | None:
    """The world ``srun``, Open MPI's ``mpirun`` or MPICH/Intel MPI's ``mpiexec`` started, from ``environ``.

    None where ``RANK`` is set (torchrun, the DeepSpeed launcher: left as they are), where none of these
    launchers started this process, or where it started one rank (a world of one, as without a launcher).
    The user's ``MASTER_ADDR``/``MASTER_PORT`` win over derived ones. ConfigError where no rendezvous can be
    derived (MPI on several nodes without ``MASTER_ADDR``).
    """
    if "RANK" in environ:
        return None
    # MPI first: an mpirun inside a SLURM allocation hands every rank the batch shell's SLURM variables.
    for recognise in (_open_mpi_ranks, _hydra_ranks, _slurm_ranks, _bare_pmi_ranks):
        ranks = recognise(environ)
        if ranks is not None:
            break
    else:
        return None
    if ranks.world_size == 1:
        return None
    if not (0 <= ranks.rank < ranks.world_size and 0 <= ranks.local_rank < ranks.local_world_size):
        raise ConfigError(f"{ranks.launcher}'s variables are inconsistent (rank {ranks.rank} of {ranks.world_size}, "
                          f"local {ranks.local_rank} of {ranks.local_world_size}): start the ranks with srun or mpirun")
    addr, port = _rendezvous(ranks, environ)
    return ClusterEnv(ranks.launcher, ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size,
                      addr, port)


def adopt_cluster_env() -> ClusterEnv | None:
    """Export the world srun/mpirun started (``cluster_env``) as torch's variables; call it before anything
    reads the rank or the world size. Once per process: after it, ``RANK`` is set and it does nothing."""
    found = cluster_env(os.environ)
    if found is not None:
        os.environ.update(found.variables())
        log.info("%s", found.describe())  # after the update: the rank-0 filter reads RANK
    return found


def _open_mpi_ranks(environ: Mapping[str, str]) -> _Ranks | None:
    if "OMPI_COMM_WORLD_RANK" not in environ:
        return None
    return _Ranks("Open MPI", _int(environ, "OMPI_COMM_WORLD_RANK"), _int(environ, "OMPI_COMM_WORLD_SIZE"),
                  _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE"),
                  _mpi_job_key(environ))


def _hydra_ranks(environ: Mapping[str, str]) -> _Ranks | None:
    """MPICH and Intel MPI's mpiexec (Hydra: MPI_LOCAL*), or Cray's PALS (PMI_LOCAL_*)."""
    if "PMI_RANK" not in environ or not any(k in environ for k in ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")):
        return None
    return _Ranks("MPICH/Intel MPI", _int(environ, "PMI_RANK"), _int(environ, "PMI_SIZE"),
                  _int(environ, "MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
                  _int(environ, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"), _mpi_job_key(environ))


def _slurm_ranks(environ: Mapping[str, str]) -> _Ranks | None:
    """srun's tasks. A batch script's own shell has SLURM_PROCID=0 too, but no step: it stays a world of one."""
    if "SLURM_PROCID" not in environ or not any(k in environ for k in _SET_BY_SRUN):
        return None
    world = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    nodes = next((environ[k] for k in _SLURM_NODELISTS if environ.get(k)), "")
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    # Two steps of one job may run at once (two sruns on a node): each gets its own port.
    key = f"slurm:{job}.{environ.get('SLURM_STEP_ID', '')}" if job else None
    return _Ranks("SLURM", _int(environ, "SLURM_PROCID"), world, _int(environ, "SLURM_LOCALID"),
                  _slurm_tasks_on_node(environ, world), key, first_host(nodes) if nodes else None)


def _bare_pmi_ranks(environ: Mapping[str, str]) -> _Ranks | None:
    """A PMI launcher that says nothing about nodes: the local rank (the GPU) cannot be told, so say what to do."""
    if "PMI_RANK" in environ and (_opt_int(environ, "PMI_SIZE") or 1) > 1:
        raise ConfigError("PMI_RANK/PMI_SIZE are set but not which ranks share a node (MPI_LOCALRANKID or "
                          "PMI_LOCAL_RANK): export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to each "
                          "rank, or start the ranks with srun or torchrun")
    return None


def _slurm_tasks_on_node(environ: Mapping[str, str], world: int) -> int:
    """This node's tasks of the step: SLURM's per-node counts ("8(x2)", "4,2") at this node's index."""
    counts = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if counts:
        per_node = tasks_per_node(counts)
        return per_node[min(_opt_int(environ, "SLURM_NODEID") or 0, len(per_node) - 1)]
    if (per := _opt_int(environ, "SLURM_NTASKS_PER_NODE")) is not None:
        return per
    nodes = _opt_int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES") or 1
    return -(-world // nodes)


def tasks_per_node(counts: str) -> list[int]:
    """SLURM's compressed task counts, one per node: "8(x2)" -> [8, 8], "2(x3),1" -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in counts.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ConfigError(f"cannot read SLURM's tasks per node {counts!r}: export LOCAL_WORLD_SIZE for each rank")
        out += [int(m[1])] * int(m[2] or 1)
    return out


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu[01-04,07],login1" -> "gpu01", "r[2-3]-n[08,10]" -> "r2-n08"."""
    first = re.match(r"(?:[^,\[\s]|\[[^\]]*\])+", nodelist.strip())  # up to the first comma outside brackets
    if first is None:
        raise ConfigError(f"cannot read SLURM's node list {nodelist!r}: export MASTER_ADDR=<rank 0's host>")
    # A bracket's first entry, zero padding kept: "[01-04,07]" -> "01".
    return re.sub(r"\[([^\]]*)\]", lambda m: m[1].split(",")[0].split("-")[0].strip(), first[0])


def _rendezvous(ranks: _Ranks, environ: Mapping[str, str]) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT: the user's where set, else derived alike on every rank."""
    addr = environ.get("MASTER_ADDR") or ranks.master_host
    if not addr and ranks.local_world_size == ranks.world_size:
        addr = "127.0.0.1"  # every rank is on this node
    if not addr:
        raise ConfigError(f"{ranks.launcher} started {ranks.world_size} ranks on several nodes, but MASTER_ADDR is not "
                          "set: export MASTER_ADDR=<rank 0's host> and MASTER_PORT=<a free port> to every rank "
                          "(mpirun -x NAME, mpiexec -genv NAME VALUE)")
    if environ.get("MASTER_PORT"):
        return addr, _int(environ, "MASTER_PORT")
    if ranks.job_key is None:
        raise ConfigError(f"{ranks.launcher} started {ranks.world_size} ranks, but no variable names their job: "
                          "export MASTER_PORT=<a free port> to every rank")
    return addr, _PORT_BASE + zlib.crc32(ranks.job_key.encode()) % _PORT_SPAN  # crc32: hash() differs per process


def _mpi_job_key(environ: Mapping[str, str]) -> str | None:
    return next((f"{k}={environ[k]}" for k in _MPI_JOB_KEYS if environ.get(k)), None)


def _opt_int(environ: Mapping[str, str], *keys: str) -> int | None:
    """The first of ``keys`` that is set, as an int; None if none is."""
    for key in keys:
        value = environ.get(key, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a whole number: unset it or set it right") from None
    return None


def _int(environ: Mapping[str, str], *keys: str) -> int:
    value = _opt_int(environ, *keys)
    if value is None:
        raise ConfigError(f"{keys[0]} is not set, but the launcher's other variables are: start the ranks with "
                          "srun, mpirun or torchrun, or export it")
    return value


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
    adopt_cluster_env()  # before DeepSpeed's own discovery: it would need mpi4py, and knows no SLURM
    if "RANK" not in os.environ:  # plain `python -m dat_ds.train` or in-process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    acc = accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(_device_index(acc))
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
        me = Peer(rank(), _node_rank(), _address_towards(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])),
                  socket.gethostname())
        _world.peers = tuple(all_gather_object(me))


def hosts() -> list[str]:
    """The hosts the world's ranks run on (known after ``init_distributed``; this host in a world of one)."""
    return sorted({p.host for p in _world.peers}) if _world.peers else [socket.gethostname()]


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
