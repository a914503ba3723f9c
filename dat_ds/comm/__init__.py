"""Compressed communication: compressor maths (``compressors``) apart from transport (``backend``).

``compressed_allreduce`` combines them into the 1-bit Adam all-reduce; ``gradient`` holds DAT's
quantized gradient all-reduce for plain optimizers.
"""

from .allreduce import compressed_allreduce, error_buffers, padded_numel
from .backend import BACKEND_NAMES, ByteMeter, TorchBackend, fp32_allreduce_bytes
from .compressors import COMPRESSORS, Compressor, SignCompressor, StochasticQuantizer, build_compressor, pack_bits, unpack_bits
from .gradient import QuantizedGradientAllReduce, check_gradient_compression

__all__ = ["BACKEND_NAMES", "COMPRESSORS", "ByteMeter", "Compressor", "QuantizedGradientAllReduce", "SignCompressor",
           "StochasticQuantizer", "TorchBackend", "build_compressor", "check_gradient_compression",
           "compressed_allreduce", "error_buffers", "fp32_allreduce_bytes", "pack_bits", "padded_numel", "unpack_bits"]
