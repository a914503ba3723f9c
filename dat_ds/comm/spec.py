"""The rules for compression settings, as plain data: importable (and checkable) without torch.

``dat_ds.runtime.ds_config`` validates the DeepSpeed JSON's ``"gradient_compression"`` section with
:func:`check_gradient_compression` before any rank starts, and the compressors in ``compressors.py``
check their own ``bits``/``block`` with the same functions, so each rule exists once. The wire
arithmetic (padding, payload and ring bytes) is here too, so ``bench simulate`` counts bytes without torch
exactly as the transport does.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import ConfigError

GRADIENT_COMPRESSION_TYPES = ("dat_quantizer",)  # the "type" values of a gradient_compression section
GRADIENT_COMPRESSION_KEYS = frozenset({"type", "bits", "block"})
QUANTIZER_BITS = (2, 4, 8)  # codes pack whole into bytes: 4, 2 or 1 per byte
BLOCK_MULTIPLE = 8  # a block of codes/signs must fill whole bytes
DEFAULT_BITS = 8
DEFAULT_BLOCK = 256  # elements per fp32 scale
SCALE_BYTES = 4  # one fp32 scale per block


def padded_numel(numel: int, world: int, block: int) -> int:
    """Smallest length >= numel that splits into ``world`` chunks of whole blocks."""
    unit = world * block
    return -(-numel // unit) * unit


def payload_bytes(m: int, bits: int, block: int) -> int:
    """Bytes of one compressed row of ``m`` elements: ``bits`` per element plus one fp32 scale per block."""
    return m * bits // 8 + SCALE_BYTES * (m // block)


def fp32_allreduce_bytes(numel: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``numel`` fp32 values."""
    return 0 if world <= 1 else (2 * (world - 1) * 4 * numel) // world


def check_block(name: str, block: Any) -> int:
    """``block`` (elements per scale) as an int, or the one-line ConfigError."""
    if not isinstance(block, int) or isinstance(block, bool) or block < BLOCK_MULTIPLE or block % BLOCK_MULTIPLE:
        raise ConfigError(f"{name} block={block!r} must be a positive multiple of {BLOCK_MULTIPLE}")
    return block


def check_quantizer(bits: Any, block: Any) -> tuple[int, int]:
    """DAT's b-bit quantizer settings, or the one-line ConfigError."""
    if isinstance(bits, bool) or bits not in QUANTIZER_BITS:
        raise ConfigError(f"dat_quantizer bits={bits!r} is not supported; use "
                          f"{', '.join(map(str, QUANTIZER_BITS[:-1]))} or {QUANTIZER_BITS[-1]}")
    return int(bits), check_block("dat_quantizer", block)


def check_gradient_compression(section: Any) -> dict[str, Any]:
    """Validate the JSON section; returns it with defaults filled in (``type``, ``bits``, ``block``)."""
    if not isinstance(section, dict) or "type" not in section:
        raise ConfigError('DeepSpeed config "gradient_compression" must be an object like {"type": "dat_quantizer", "bits": 8}')
    unknown = sorted(set(section) - GRADIENT_COMPRESSION_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in gradient_compression; allowed: "
                          f"{', '.join(sorted(GRADIENT_COMPRESSION_KEYS))}")
    if section["type"] not in GRADIENT_COMPRESSION_TYPES:
        raise ConfigError(f"gradient_compression type {section['type']!r} is unknown; choose one of: "
                          f"{', '.join(GRADIENT_COMPRESSION_TYPES)}")
    bits, block = check_quantizer(section.get("bits", DEFAULT_BITS), section.get("block", DEFAULT_BLOCK))
    return {"type": section["type"], "bits": bits, "block": block}
