"""Compressor maths: tensors in, uint8 payloads out, and back. No communication here.

A compressor works on a 2-D float tensor ``x`` of shape ``[rows, m]`` (one row per destination rank)
and returns a ``uint8`` payload ``[rows, payload_bytes(m)]`` that carries everything needed to decode
the row -- packed codes *and* the per-block fp32 scales -- so the transport moves one byte tensor per
collective. ``m`` must be a multiple of ``block`` (callers pad).

* ``onebit`` -- sign compression (1-bit Adam, Tang et al. 2021): each block of ``block`` elements is
  sent as its signs (8 per byte) and one scale ``||x_block||_2 / sqrt(block)``; biased, so callers
  keep error feedback (``error_feedback = True``).
* ``dat_quantizer`` -- DAT's randomized b-bit quantizer (Zhang et al. 2022), rewritten to be unbiased
  and zero-safe: each block is mapped onto ``2^b`` evenly spaced levels on ``[-s, s]`` with
  ``s = max|x_block|`` and rounded stochastically, so ``E[decode(encode(x))] = x`` exactly; an
  all-zero block has ``s = 0`` and decodes to zeros (no division by zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from ..core.registry import Registry
from .spec import DEFAULT_BITS, DEFAULT_BLOCK, check_block, check_quantizer, payload_bytes

COMPRESSORS: Registry[type] = Registry("compressor")



def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes < 2**bits (last dim a multiple of 8 // bits) into uint8, little-endian."""
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    # bool -> uint8 is a view, not a copy (sign masks arrive as bool); fields are OR-ed in with shifts on
    # uint8 slices: 2 * (per_byte - 1) passes over 1/per_byte of the data, no int32 temporaries.
    c = codes.view(torch.uint8) if codes.dtype == torch.bool else codes.to(torch.uint8)
    c = c.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    out = c[..., 0].clone()
    for i in range(1, per_byte):
        out |= c[..., i] << (bits * i)
    return out


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., k]`` -> codes ``[..., k * 8 // bits]`` (uint8)."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    shifts = (bits * torch.arange(per_byte, device=packed.device)).to(torch.uint8)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` float32: row b holds the 8 signs (+1 / -1) that byte b packs, bit 0 first."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[device] = (bits.to(torch.float32) * 2 - 1).to(device)
    return table


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., k]`` of packed signs -> float32 ``[..., 8 k]`` of +1 / -1, in one table lookup."""
    table = _sign_table(packed.device)
    signs = table.index_select(0, packed.reshape(-1).to(torch.int32))
    return signs.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _scales_to_bytes(scales: torch.Tensor) -> torch.Tensor:
    return scales.to(torch.float32).contiguous().view(torch.uint8)


def _bytes_to_scales(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float32)


@dataclass
class Compressor:
    """Base: encode rows of ``m`` elements into ``payload_bytes(m)`` bytes; decode back to float32."""

    block: int = DEFAULT_BLOCK
    error_feedback: bool = False
    bits: int = 1

    def check(self, m: int) -> None:
        if m % self.block:
            raise ValueError(f"row length {m} is not a multiple of the block size {self.block}")

    def payload_bytes(self, m: int) -> int:
        return payload_bytes(m, self.bits, self.block)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, m: int) -> torch.Tensor:
        raise NotImplementedError

    def roundtrip(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What the receiver reconstructs from ``x`` (used for error feedback)."""
        return self.decode(self.encode(x, generator), x.shape[-1])


@COMPRESSORS.register("onebit")
@dataclass
class SignCompressor(Compressor):
    """Signs packed 8 per byte plus one ``||x||_2 / sqrt(n)`` scale per block (biased: use error feedback)."""

    block: int = DEFAULT_BLOCK
    error_feedback: bool = True
    bits: int = 1

    def __post_init__(self):
        check_block("onebit compressor", self.block)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        rows, m = x.shape
        self.check(m)
        blocks = x.reshape(rows, m // self.block, self.block).float()
        # Mean-square scale keeps ||decoded|| == ||x|| per block, the choice of 1-bit Adam.
        scales = torch.linalg.vector_norm(blocks, dim=-1).div_(math.sqrt(self.block))
        payload = torch.empty(rows, self.payload_bytes(m), dtype=torch.uint8, device=x.device)
        payload[:, :m // 8] = pack_bits(x >= 0, 1)  # written into the payload row, no concatenation
        payload[:, m // 8:] = _scales_to_bytes(scales).reshape(rows, -1)
        return payload

    def decode(self, payload: torch.Tensor, m: int) -> torch.Tensor:
        rows = payload.shape[0]
        sign_bytes = m // 8
        signs = unpack_signs(payload[:, :sign_bytes])  # +1 / -1 as float32, a fresh tensor: scaled in place
        scales = _bytes_to_scales(payload[:, sign_bytes:]).reshape(rows, m // self.block, 1)
        return signs.view(rows, m // self.block, self.block).mul_(scales).view(rows, m)


@COMPRESSORS.register("dat_quantizer")
@dataclass
class StochasticQuantizer(Compressor):
    """Unbiased, zero-safe randomized b-bit quantizer (DAT's gradient quantizer, bias fixed)."""

    block: int = DEFAULT_BLOCK
    error_feedback: bool = False
    bits: int = DEFAULT_BITS

    def __post_init__(self):
        self.bits, self.block = check_quantizer(self.bits, self.block)  # the rule ds_config checks, torch-free

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1  # intervals between the 2^b levels on [-s, s]

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        rows, m = x.shape
        self.check(m)
        blocks = x.reshape(rows, m // self.block, self.block).float()
        low, high = torch.aminmax(blocks, dim=-1, keepdim=True)  # one pass, no |x| temporary
        scales = torch.maximum(high, low.neg_()).abs_()  # abs_: an all-zero block gives +0.0, not -0.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # zero block: any code decodes to 0
        position = (blocks + safe).div_(2 * safe).mul_(self.levels)  # in [0, levels]; in place after the first op
        low = position.floor()
        noise = torch.rand(position.shape, generator=generator, device=x.device, dtype=position.dtype)
        # Round up with probability equal to the fractional part: E[code] = position, hence unbiased.
        codes = low.add_(noise < position.sub_(low)).clamp_(0, self.levels).to(torch.uint8).view(rows, m)
        payload = torch.empty(rows, self.payload_bytes(m), dtype=torch.uint8, device=x.device)
        code_bytes = m * self.bits // 8
        payload[:, :code_bytes] = pack_bits(codes, self.bits)
        payload[:, code_bytes:] = _scales_to_bytes(scales.reshape(rows, -1)).reshape(rows, -1)
        return payload

    def decode(self, payload: torch.Tensor, m: int) -> torch.Tensor:
        rows = payload.shape[0]
        code_bytes = m * self.bits // 8
        codes = unpack_bits(payload[:, :code_bytes], self.bits).to(torch.float32)
        scales = _bytes_to_scales(payload[:, code_bytes:]).reshape(rows, m // self.block, 1)
        # code c decodes to s * (2 c / levels - 1): one fused multiply-add per element
        out = torch.addcmul(scales.neg(), codes.view(rows, m // self.block, self.block), scales * (2.0 / self.levels))
        return out.view(rows, m)


def build_compressor(name: str, **kwargs) -> Compressor:
    cls = COMPRESSORS.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad option for compressor {name!r} ({e}); allowed: block, bits") from None
