#!/usr/bin/env bash
# GPU smoke test on one CUDA device (<= 8 minutes): every one-rank ds_config, bf16, ZeRO-3, the attacks
# in bf16, AutoAttack eval on 200 images, pretrain/finetune/pseudo-label, and DAT-PGD-10 samples/s of
# dat-ds vs a plain PyTorch loop. Writes bench/gpu_smoke.json (or <out>/gpu_smoke.json).
#   scripts/gpu_smoke.sh [--out DIR] [other `dat-ds bench gpu-smoke` options]
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one device, whatever the machine has
if command -v uv >/dev/null 2>&1; then
  exec uv run dat-ds bench gpu-smoke "$@"
fi
exec python -m dat_ds.cli bench gpu-smoke "$@"
