#!/usr/bin/env bash
# GPU smoke test on one CUDA device (<= 8 minutes): every one-rank ds_config, bf16, ZeRO-3, the attacks
# in bf16, AutoAttack eval on 200 images, pretrain/finetune/pseudo-label, and DAT-PGD-10 samples/s of
# dat-ds vs a plain PyTorch loop. Run it from a checkout; every result goes to one folder.
#
#   scripts/gpu_smoke.sh [--out DIR]                  # uv on PATH: `uv run` (uv.lock's versions; network or uv's cache)
#   scripts/gpu_smoke.sh --wheels DIR [--out DIR]     # a bare, offline machine: the machine's python3 and torch, plus
#                                                     # DIR's wheels (scripts/wheelhouse.sh) for what it lacks
#   scripts/gpu_smoke.sh --system                     # the machine's python3 already has every dependency
# Options (anything else goes to `dat-ds bench gpu-smoke`, e.g. --bench-repeats 1):
#   --out DIR          results folder (default $OUT, else bench/gpu_smoke): gpu_smoke.json, gpu_smoke.log,
#                      env.txt, pip.log (wheel mode), nvidia-smi.txt
#   --wheels DIR       (or WHEEL_DIR) wheels to install, offline, into a temporary --target folder, only where the
#                      machine lacks the package or has an older one; dat-ds itself always comes from this checkout
#   --uv | --system    force `uv run`, or the machine's python3 as it is
#   --python PY        (or PY) the interpreter with the machine's torch (default python3)
#   --budget-s S       the smoke's own budget: no check starts after S seconds (default 360)
#   --hard-timeout S   kill the smoke after S seconds (default 480); give a job runner ~60 s more
#   --allow-cpu        go on when DeepSpeed's accelerator is not CUDA (the smoke then refuses in one line,
#                      exit 2): tests the install and import path on a CPU machine
# Exit codes: 0 every check ok; 1 a check failed; 2 bad usage, no wheels, or the smoke refused (no CUDA);
# 3 pip failed; 4 the import check failed or no CUDA device; 124 the hard timeout.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="" OUT_DIR="${OUT:-}" WHEELS="${WHEEL_DIR:-}" PY="${PY:-python3}"
BUDGET_S="${SMOKE_BUDGET_S:-360}" HARD_TIMEOUT_S="${HARD_TIMEOUT_S:-480}" ALLOW_CPU=0
SMOKE_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --uv) MODE=uv; shift ;;
    --system) MODE=system; shift ;;
    --python) PY="$2"; shift 2 ;;
    --budget-s) BUDGET_S="$2"; shift 2 ;;
    --hard-timeout) HARD_TIMEOUT_S="$2"; shift 2 ;;
    --allow-cpu) ALLOW_CPU=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) SMOKE_ARGS+=("$1"); shift ;;
  esac
done
if [ -z "$MODE" ]; then
  if [ -n "$WHEELS" ]; then MODE=wheels; elif command -v uv >/dev/null 2>&1; then MODE=uv; else MODE=system; fi
fi
[ "$MODE" = wheels ] && [ -z "$WHEELS" ] && MODE=system
OUT_DIR="${OUT_DIR:-$ROOT/bench/gpu_smoke}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || { echo "gpu_smoke: cannot create $OUT_DIR" >&2; exit 2; }
[ -n "$WHEELS" ] && [ -d "$WHEELS" ] && WHEELS="$(cd "$WHEELS" && pwd)"
cd "$ROOT" || exit 2

LOG="$OUT_DIR/gpu_smoke.log"
: >"$LOG"
say() { echo "[gpu_smoke $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }
fatal() { local rc="$1"; shift; say "FATAL: $*"; exit "$rc"; }
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"  # one device, whatever the machine has

# ---------------------------------------------------------------- 1. the dependencies
case "$MODE" in
  uv)
    command -v uv >/dev/null 2>&1 || fatal 2 "--uv given but uv is not on PATH"
    RUN=(uv run python) ;;
  wheels)
    command -v "$PY" >/dev/null 2>&1 || fatal 2 "no $PY (pass --python, or PY=, the interpreter that has torch)"
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || fatal 2 "no wheels in '$WHEELS' (make them with scripts/wheelhouse.sh --python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3.X) --out DIR)"
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/dat-ds-smoke-site.XXXXXX")"
    trap 'rm -rf "$SITE"' EXIT
    # What the machine lacks, or has older where torch does not depend on it (torch's own pins, e.g. sympy,
    # stay as they are); never the GPU stack, never dat-ds (this checkout's).
    mapfile -t NEED < <("$PY" - "$WHEELS"/*.whl <<'EOF'
import importlib.metadata as md, re, sys
try:
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.version import Version

def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()

torch_deps = set()
for dist in ("torch", "torchvision"):
    try:
        torch_deps |= {norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in md.requires(dist) or ()}
    except md.PackageNotFoundError:
        pass
for path in sys.argv[1:]:
    name, version = re.match(r"([^-]+)-([^-]+)-", path.rsplit("/", 1)[-1]).groups()
    if re.fullmatch(r"(dat_ds|torch|torchvision|torchaudio|triton|nvidia_.*|cuda_.*)", norm(name)):
        continue
    try:
        if Version(md.version(name)) >= Version(version) or norm(name) in torch_deps:
            continue
    except md.PackageNotFoundError:
        pass
    print(path)
EOF
    ) || fatal 2 "$PY could not read the wheel folder"
    if [ "${#NEED[@]}" -gt 0 ]; then
      if ! "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --target "$SITE" "${NEED[@]}" >"$OUT_DIR/pip.log" 2>&1; then
        tail -20 "$OUT_DIR/pip.log" | tee -a "$LOG"; fatal 3 "pip install of the wheels failed (see pip.log)"
      fi
    else
      echo "every package of $WHEELS is already installed" >"$OUT_DIR/pip.log"
    fi
    say "installed ${#NEED[@]} wheel(s) from $WHEELS into $SITE: $(for w in "${NEED[@]}"; do printf '%s ' "$(basename "$w" | cut -d- -f1,2)"; done)"
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"  # inherited by the DeepSpeed launcher and its ranks
    RUN=("$PY") ;;
  system)
    command -v "$PY" >/dev/null 2>&1 || fatal 2 "no $PY (pass --python, or PY=, the interpreter that has torch)"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    RUN=("$PY") ;;
esac
say "mode $MODE: ${RUN[*]}, results in $OUT_DIR"

# ---------------------------------------------------------------- 2. the machine
{
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>&1; nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1
  else
    echo "no nvidia-smi on PATH"
  fi
  echo "== python, torch, packages"
  "${RUN[@]}" - <<'EOF' 2>&1
import importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "cap", torch.cuda.get_device_capability(0),
          "bf16", torch.cuda.is_bf16_supported(), "cudnn", torch.backends.cudnn.version(),
          "nccl", torch.cuda.nccl.version())
for name in ("torchvision", "deepspeed", "timm", "pydantic", "pydantic-core", "hjson", "torchattacks", "numpy",
             "scipy", "matplotlib", "rich", "safetensors", "pyyaml", "datasets", "typing-extensions", "ninja",
             "psutil", "py-cpuinfo", "msgpack", "einops", "packaging"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
EOF
} >"$OUT_DIR/env.txt" 2>&1
say "machine: $(grep -m1 '^device' "$OUT_DIR/env.txt" || echo 'NO CUDA DEVICE'); $(grep -m1 '^torch' "$OUT_DIR/env.txt" || echo 'no torch')"
grep -q '^torch ' "$OUT_DIR/env.txt" || { tail -5 "$OUT_DIR/env.txt" | tee -a "$LOG"; fatal 4 "${RUN[*]} cannot import torch (see env.txt)"; }
if ! grep -q '^device' "$OUT_DIR/env.txt" && [ "$ALLOW_CPU" != 1 ]; then  # before the slower imports below
  fatal 4 "no CUDA device: $(grep -m1 '^torch' "$OUT_DIR/env.txt"), CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES (--allow-cpu goes on)"
fi

# ---------------------------------------------------------------- 3. imports (fail fast, one line)
"${RUN[@]}" - "$ALLOW_CPU" <<'EOF' 2>&1 | tee -a "$LOG"
import sys, time
t = time.perf_counter()
try:
    import torch, deepspeed, pydantic, hjson, torchattacks, timm
    from deepspeed.accelerator import get_accelerator
    import dat_ds.cli, dat_ds.runtime.trainer, dat_ds.attacks.external, benchmarks.gpu_smoke
except Exception as e:  # noqa: BLE001 - reported in one line, the smoke would not start
    sys.exit(f"FATAL: import failed: {type(e).__name__}: {e}")
acc = get_accelerator()
print(f"imports ok in {time.perf_counter() - t:.1f}s: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"deepspeed {deepspeed.__version__}, pydantic {pydantic.VERSION}, timm {timm.__version__}, "
      f"dat_ds from {dat_ds.__path__[0]}, accelerator {acc.device_name()}/{acc.communication_backend_name()}")
if acc.device_name() != "cuda":
    msg = (f"DeepSpeed's accelerator is {acc.device_name()!r}, not cuda (torch.cuda.is_available()="
           f"{torch.cuda.is_available()}, CUDA_VISIBLE_DEVICES={__import__('os').environ.get('CUDA_VISIBLE_DEVICES')})")
    if sys.argv[1] != "1":
        print(f"no CUDA device: {msg}")
        sys.exit(5)
    print(f"--allow-cpu: {msg}; the smoke will refuse")
EOF
case "${PIPESTATUS[0]}" in
  0) ;;
  5) fatal 4 "no CUDA device (--allow-cpu goes on)" ;;
  *) if [ "$MODE" = wheels ]; then hint="a wheel folder from scripts/wheelhouse.sh without --minimal has every dependency"
     else hint="offline, give it wheels: scripts/wheelhouse.sh, then --wheels DIR"; fi
     fatal 4 "import check failed; the smoke would not start (env.txt has the versions; $hint)" ;;
esac

# ---------------------------------------------------------------- 4. the smoke, within a budget
say "gpu-smoke: --budget-s $BUDGET_S, hard timeout ${HARD_TIMEOUT_S}s ${SMOKE_ARGS[*]-}"
timeout --signal=TERM --kill-after=20 "$HARD_TIMEOUT_S" \
  "${RUN[@]}" -m dat_ds.cli bench gpu-smoke --out "$OUT_DIR" --budget-s "$BUDGET_S" ${SMOKE_ARGS[@]+"${SMOKE_ARGS[@]}"} 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "gpu-smoke exit code $rc$([ "$rc" = 124 ] && echo ' (hard timeout)')"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1

# ---------------------------------------------------------------- 5. one-screen summary
if [ -f "$OUT_DIR/gpu_smoke.json" ]; then
  "${RUN[@]}" - "$OUT_DIR/gpu_smoke.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"device {r.get('device_name')}: {r.get('seconds', 0):.0f}s, goal_met={r.get('goal_met')}, "
      f"bf16_ok={r.get('bf16_ok')}, zero3_ok={r.get('zero3_ok')}, failed={r.get('failed')}")
for name, c in r.get("checks", {}).items():
    why = c.get("error") or c.get("why") or ""
    print(f"  {c.get('status', '?'):7s} {c.get('seconds', 0):6.1f}s  {name}  {why[:160]}")
sp = r.get("checks", {}).get("speed", {})
if sp.get("status") == "ok":
    print("  samples/s:", {k: round(v, 1) for k, v in sp["samples_per_s"].items()},
          "ratio", round(sp["dat_ds_over_plain"], 3))
sys.exit(1 if r.get("failed") else 0)
EOF
  summary_rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] && rc=$summary_rc
else
  say "no gpu_smoke.json: the smoke did not finish (see gpu_smoke.log)"
fi
exit "$rc"
