"""Compressed communication: compressor maths (``compressors``) apart from transport (``backend``).

``compressed_allreduce`` combines them into the 1-bit Adam all-reduce; ``gradient`` holds DAT's
quantized all-reduce around a plain optimizer; ``protocol`` is the contract every optimizer that
communicates itself fulfils (``CommunicatingOptimizer``); ``spec`` holds the settings' rules as plain
data. ``spec`` and ``protocol`` import no torch, so the names below are loaded on first use: a
torch-free caller (config validation, the CLI) may import ``dat_ds.comm.spec`` directly.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "compressed_allreduce": "allreduce", "error_buffers": "allreduce", "padded_numel": "spec",
    "BACKEND_NAMES": "backend", "ByteMeter": "backend", "TorchBackend": "backend", "fp32_allreduce_bytes": "spec",
    "COMPRESSORS": "compressors", "Compressor": "compressors", "SignCompressor": "compressors",
    "StochasticQuantizer": "compressors", "build_compressor": "compressors", "pack_bits": "compressors",
    "unpack_bits": "compressors",
    "QuantizedAllReduceOptimizer": "gradient",
    "CommunicatingOptimizer": "protocol",
    "GRADIENT_COMPRESSION_TYPES": "spec", "QUANTIZER_BITS": "spec", "check_gradient_compression": "spec",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
