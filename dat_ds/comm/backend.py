"""Transport: ``torch.distributed`` collectives on uint8 payloads, with byte accounting.

Works on gloo (CPU) and NCCL alike: payloads are plain uint8 tensors moved by ``all_to_all_single``
and ``all_gather_into_tensor`` (both verified on gloo), so no cupy/MPI is needed. DeepSpeed 0.18's
``comm_backend_name`` values ("nccl", "mpi", "gloo", "torch") all map onto ``torch.distributed`` with
the process group the run already uses.

Byte accounting counts what *this rank* puts on the wire: for an all-to-all of ``W`` equal rows, the
``W - 1`` rows it sends away; for an all-gather of one row, ``W - 1`` copies of it (what a ring
all-gather forwards). The fp32 reference is a ring all-reduce: ``2 (W - 1) / W * 4 n`` bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from ..core.errors import ConfigError
from .spec import fp32_allreduce_bytes

log = logging.getLogger(__name__)

BACKEND_NAMES = ("nccl", "mpi", "gloo", "torch")


@dataclass
class ByteMeter:
    """Cumulative and last-step bytes sent by this rank, next to the fp32 all-reduce equivalent."""

    bytes_sent: int = 0
    bytes_fp32_equiv: int = 0
    step_bytes_sent: int = 0
    step_bytes_fp32_equiv: int = 0

    def start_step(self) -> None:
        self.step_bytes_sent = 0
        self.step_bytes_fp32_equiv = 0

    def add(self, sent: int, fp32_equiv: int) -> None:
        self.bytes_sent += int(sent)
        self.bytes_fp32_equiv += int(fp32_equiv)
        self.step_bytes_sent += int(sent)
        self.step_bytes_fp32_equiv += int(fp32_equiv)

    def as_dict(self) -> dict[str, float]:
        ratio = self.bytes_fp32_equiv / self.bytes_sent if self.bytes_sent else 0.0
        step_ratio = self.step_bytes_fp32_equiv / self.step_bytes_sent if self.step_bytes_sent else 0.0
        return {"bytes_sent": self.bytes_sent, "bytes_fp32_equiv": self.bytes_fp32_equiv,
                "ratio": ratio, "step_bytes_sent": self.step_bytes_sent,
                "step_bytes_fp32_equiv": self.step_bytes_fp32_equiv, "step_ratio": step_ratio}

    def state_dict(self) -> dict[str, int]:
        return {"bytes_sent": self.bytes_sent, "bytes_fp32_equiv": self.bytes_fp32_equiv}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.bytes_sent = int(state.get("bytes_sent", 0))
        self.bytes_fp32_equiv = int(state.get("bytes_fp32_equiv", 0))


_gather_single = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor


class TorchBackend:
    """Collectives over the default (or a given) ``torch.distributed`` process group; a no-op for one rank."""

    def __init__(self, group=None, name: str = "torch", meter: ByteMeter | None = None):
        if name not in BACKEND_NAMES:
            raise ConfigError(f"comm_backend_name={name!r} is not supported; use one of {', '.join(BACKEND_NAMES)}")
        self.group = group
        self.name = name
        self.meter = meter if meter is not None else ByteMeter()
        initialised = tdist.is_available() and tdist.is_initialized()
        self.world = tdist.get_world_size(group) if initialised else 1
        self.rank = tdist.get_rank(group) if initialised else 0
        self.dist_backend = tdist.get_backend(group) if initialised else "none"
        if name != "torch":
            log.info("comm_backend_name=%r: compressed collectives run on torch.distributed (%s backend)",
                     name, self.dist_backend)

    def all_to_all(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows[j]`` goes to rank ``j``; returns ``out[j]`` = what rank ``j`` sent here."""
        if self.world == 1:
            return rows
        rows = rows.contiguous()
        out = torch.empty_like(rows)
        tdist.all_to_all_single(out, rows, group=self.group)
        self.meter.add(rows[0].numel() * rows.element_size() * (self.world - 1), 0)
        return out

    def all_gather(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's ``row`` stacked as ``[world, *row.shape]``."""
        if self.world == 1:
            return row.unsqueeze(0)
        row = row.contiguous()
        out = torch.empty((self.world * row.numel(),), dtype=row.dtype, device=row.device)
        _gather_single(out, row.reshape(-1), group=self.group)
        self.meter.add(row.numel() * row.element_size() * (self.world - 1), 0)
        return out.view(self.world, *row.shape)

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Uncompressed fp32 average in place (the warm-up stage)."""
        if self.world == 1:
            return tensor
        tdist.all_reduce(tensor, group=self.group)
        tensor.div_(self.world)
        nbytes = fp32_allreduce_bytes(tensor.numel(), self.world)
        self.meter.add(nbytes, nbytes)
        return tensor

    def account_reference(self, numel: int) -> None:
        """Record what an fp32 all-reduce of ``numel`` values would have cost (the compressed path calls this)."""
        self.meter.add(0, fp32_allreduce_bytes(numel, self.world))
