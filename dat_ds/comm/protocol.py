"""The contract between an optimizer that communicates itself and the runtime that trains with it.

DeepSpeed's own gradient all-reduce is switched off for these optimizers; they average over ranks
inside ``step()`` (compressed) and therefore own state that differs per rank, which DeepSpeed's ZeRO-0
checkpoint (rank 0's optimizer state, loaded on every rank) cannot hold. The runtime reaches them
through this protocol only -- ``BuiltEngine.comm`` is one, or None -- never by looking for attributes:

* ``comm_stats()`` goes into ``metrics.jsonl`` as ``comm_*`` (stage, bytes sent vs fp32, ...);
* ``rank_local_state()`` / ``load_rank_local_state()`` go into and come out of ``rank_state_<r>.pt``;
* ``label``, ``scheme`` and ``warmup_steps`` let the start-up log say what compression really does;
* ``skips_compression`` is true at world size 1, where there is nothing to communicate: then every step
  is the ``uncompressed`` algorithm's, exactly (a lossy compression there would save nothing).

Implementers: ``dat_ds.optim.onebit`` (1-bit Adam, 0/1 Adam, 1-bit LAMB) and
``dat_ds.comm.gradient.QuantizedAllReduceOptimizer`` (DAT's quantized all-reduce around any optimizer).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

SKIPPED_NOTE = "compression skipped: world size 1, nothing to communicate"


@runtime_checkable
class CommunicatingOptimizer(Protocol):
    label: str  # for logs, e.g. "1-bit Adam"
    scheme: str  # what goes on the wire once compression is on, e.g. "1-bit compressed momentum"
    uncompressed: str  # the algorithm it approximates, and runs as when it skips compression, e.g. "Adam"

    @property
    def skips_compression(self) -> bool:
        """True at world size 1: every step is the uncompressed algorithm's (nothing is sent)."""
        ...

    @property
    def warmup_steps(self) -> int:
        """Optimizer steps with uncompressed (fp32) communication before the first compressed one."""
        ...

    def comm_stats(self) -> dict[str, Any]:
        """``stage``, ``world_size``, bytes this rank sent and their fp32 all-reduce equivalent, ..."""
        ...

    def rank_local_state(self) -> dict[str, Any]:
        """This rank's private state (tensors and plain data only) for its own checkpoint file."""
        ...

    def load_rank_local_state(self, state: dict[str, Any]) -> Any:
        """Restore :meth:`rank_local_state`, after DeepSpeed loaded the shared optimizer state."""
        ...
