"""Compressed all-reduce: the 1-bit Adam algorithm (Tang et al. 2021), for any compressor.

``compress -> all-to-all of chunks -> each rank averages its chunk (+ its server error) -> compress
again -> all-gather``. Each rank sends ``2 (W - 1) / W`` compressed copies of the tensor, the same
pattern as a ring all-reduce, so the saving over fp32 is the compressor's ratio for any world size.
With a biased compressor (signs) the residual of both compressions is fed back into the next call:
``worker_error`` on every rank for the whole tensor, ``server_error`` for the chunk the rank serves.
An unbiased compressor (DAT's quantizer) needs no error feedback: the result is an unbiased estimate
of the exact mean.
"""

from __future__ import annotations

import torch

from .backend import TorchBackend
from .compressors import Compressor
from .spec import padded_numel


def error_buffers(numel: int, world: int, block: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (worker_error, server_error) for a tensor of ``numel`` elements."""
    n = padded_numel(numel, world, block)
    return torch.zeros(n, device=device), torch.zeros(n // world, device=device)


def compressed_allreduce(tensor: torch.Tensor, compressor: Compressor, backend: TorchBackend,
                         worker_error: torch.Tensor | None = None, server_error: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Average ``tensor`` (any shape) over ranks through ``compressor``; returns a new float32 tensor.

    Every rank gets the identical result (it is decoded from the same all-gathered bytes). The error
    buffers, when given, are updated in place and must come from :func:`error_buffers`.
    """
    world = backend.world
    numel = tensor.numel()
    n = padded_numel(numel, world, compressor.block)
    m = n // world
    # Each line below is one pass over the data with no temporary beyond what it names: on a CPU these
    # passes, not the bytes on the wire, are the cost of a compressed step once the link is fast.
    x = torch.empty(n, dtype=torch.float32, device=tensor.device)
    if worker_error is not None:
        torch.add(tensor.reshape(-1), worker_error[:numel], out=x[:numel])
        x[numel:] = worker_error[numel:]
    else:
        x[:numel] = tensor.reshape(-1)
        x[numel:] = 0
    rows = x.view(world, m)
    payload = compressor.encode(rows, generator)
    if worker_error is not None:
        torch.sub(x, compressor.decode(payload, m).view(-1), out=worker_error)
    received = backend.all_to_all(payload)  # received[j]: rank j's compressed copy of my chunk
    chunk = compressor.decode(received, m).mean(0)
    if server_error is not None:
        chunk += server_error
    server_payload = compressor.encode(chunk.unsqueeze(0), generator)
    if server_error is not None:
        torch.sub(chunk, compressor.decode(server_payload, m)[0], out=server_error)
    gathered = backend.all_gather(server_payload[0])
    backend.account_reference(numel)
    return compressor.decode(gathered, m).reshape(-1)[:numel].reshape(tensor.shape)
