"""The accelerator's speed and determinism switches for training: ``train.tf32`` and ``train.deterministic``.

On CUDA, three process-wide settings decide both speed and reproducibility:
- ``cudnn.benchmark``: cuDNN times its convolution algorithms on the first batch of each shape and keeps the
  fastest. Fixed input shapes (as here) make it pure gain, but the choice may differ from run to run.
- TF32: fp32 matmuls and convolutions on Ampere+ tensor cores with a 10-bit mantissa (fp32's range), several
  times fp32's speed; bf16 and fp16 weights do not use it.
- deterministic kernels: the bit-exact resume and "N ranks = 1 rank" guarantees need every kernel to give the
  same bits every time, which some CUDA kernels (atomics in backward passes) do not by default.

``train.deterministic`` trades speed for the guarantee: no autotuning, deterministic algorithms only (an op
that has none warns by name instead of failing), and cuBLAS's fixed workspace. On the CPU every kernel is
deterministic already, and these switches change nothing.
"""

from __future__ import annotations

import logging
import os

import torch

from ..core.config import TrainConfig

log = logging.getLogger(__name__)

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to pick deterministic reductions (CUDA >= 10.2)


def configure(train: TrainConfig, device_type: str) -> str | None:
    """Apply ``train.tf32`` and ``train.deterministic`` to this process; returns one line saying what that means on
    CUDA (None elsewhere: nothing changes there).

    Call before the first CUDA kernel (cuBLAS reads its workspace setting when it first starts)."""
    deterministic = train.deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = train.tf32
    torch.backends.cudnn.allow_tf32 = train.tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device_type != "cuda":
        return None
    if deterministic:
        return ("train.deterministic: deterministic kernels only, cuDNN autotuning off (slower: the bit-exact "
                f"guarantees cost speed; set it false for speed){', TF32 on' if train.tf32 else ''}")
    return f"cuDNN autotuning on{', TF32 matmuls and convolutions' if train.tf32 else ', TF32 off (train.tf32)'}"
