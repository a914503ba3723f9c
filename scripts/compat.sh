#!/usr/bin/env bash
# Install dat-ds the way a cluster does -- its own torch first, then the wheel -- on a given Python, and
# run a short subset: the CLI, a bad config (exit 2), one training epoch cut short and resumed, 2 ranks on
# ZeRO-3 bf16, and AutoAttack on 32 images. Prints the versions it used; exits non-zero on any failure.
#
#   scripts/compat.sh                          # the tested matrix (MATRIX below), one entry after the other
#   scripts/compat.sh --python 3.10 --torch 'torch==2.6.0 torchvision==0.21.0' [--floors]
#   scripts/compat.sh --python /opt/py/bin/python3.12 --torch 'torch==2.8.0 torchvision==0.23.0' --deepspeed 'deepspeed==0.18.0'
#   scripts/compat.sh --find-python 3.13       # print the interpreter --python 3.13 would use (exit 3: none)
#
# Options:
#   --python V|PATH   interpreter: a version (found as pythonV on PATH, under `pyenv root`, or by uv) or a path
#   --torch SPEC      what is installed first, as the cluster's torch (default: the newest on PyPI)
#   --deepspeed SPEC  pin deepspeed (default: what dat-ds's range resolves to; with --floors, its floor)
#   --floors          dat-ds's own dependencies at the lowest versions pyproject.toml allows (uv's
#                     --resolution lowest-direct), to test the floors we publish
#   --timeout S       wall-clock budget of one entry, install included (default 1500)
#   --keep            keep the temporary folder (venv, logs, runs) and print where it is
# Needs uv and network access to PyPI (torch wheels from PyPI are CUDA builds; they run on a CPU too).
# Everything goes to one temporary folder, removed on exit. An entry takes 5-8 minutes on 2 shared CPU cores
# once uv's cache holds the wheels (a first torch download adds ~3 GB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The matrix the README's "Installing on a cluster" table reports: the oldest supported Python with the
# oldest supported torch and every dependency at its floor, and the newest Python with the newest torch.
OLDEST_TORCH="torch==2.6.0 torchvision==0.21.0"
MATRIX=(
  "3.10|$OLDEST_TORCH|--floors"
  "3.13|torch torchvision|"
)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "compat: $*" >&2; exit 1; }

find_python() {  # version or path -> an interpreter that runs, on stdout
  local want="$1" cand root
  if [[ "$want" == */* ]]; then
    [ -x "$want" ] && "$want" -c 'import sys' 2>/dev/null && { echo "$want"; return 0; }
    return 1
  fi
  local cands=("python$want")
  if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then
    # pyenv's shims answer only for the selected version; the installs themselves always run
    while IFS= read -r cand; do cands+=("$cand"); done < <(ls -d "$root"/versions/"$want"*/bin/python"$want" 2>/dev/null | sort -rV)
  fi
  for cand in "${cands[@]}"; do
    if "$cand" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$want'" >/dev/null 2>&1; then
      command -v "$cand"; return 0
    fi
  done
  cand="$(uv python find "$want" 2>/dev/null)" && [ -n "$cand" ] && { echo "$cand"; return 0; }
  return 1
}

PYTHON="" TORCH_SPEC="torch torchvision" DS_SPEC="" FLOORS=0 TIMEOUT=1500 KEEP=0
[ $# -gt 0 ] || set -- --matrix
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHON="$2"; shift 2 ;;
    --torch) TORCH_SPEC="$2"; shift 2 ;;
    --deepspeed) DS_SPEC="$2"; shift 2 ;;
    --floors) FLOORS=1; shift ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --find-python) find_python "$2" || { echo "compat: no Python $2 found" >&2; exit 3; }; exit 0 ;;
    --matrix) MATRIX_MODE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option $1" ;;
  esac
done
command -v uv >/dev/null 2>&1 || die "needs uv (https://docs.astral.sh/uv/): pip install uv"

if [ "${MATRIX_MODE:-0}" = 1 ]; then
  failed=0 report=()
  for entry in "${MATRIX[@]}"; do
    IFS='|' read -r py torch extra <<<"$entry"
    echo "=== compat: Python $py, $torch${extra:+ $extra}"
    start=$SECONDS
    # shellcheck disable=SC2086
    if "$0" --python "$py" --torch "$torch" --timeout "$TIMEOUT" $extra; then status=ok; else status=FAILED; failed=1; fi
    report+=("$status  Python $py, $torch${extra:+ $extra}: $((SECONDS - start)) s")
  done
  echo "=== compat matrix"; printf '  %s\n' "${report[@]}"
  exit "$failed"
fi

[ -n "$PYTHON" ] || die "--python is required with --torch/--deepspeed/--floors (or run without arguments for the matrix)"
PY="$(find_python "$PYTHON")" || die "no Python $PYTHON found (pass --python /path/to/python$PYTHON)"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/dat-ds-compat.XXXXXX")"
cleanup() { if [ "$KEEP" = 1 ]; then echo "compat: kept $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT
trap 'exit 143' TERM INT HUP
LOGS="$TMP/logs"; mkdir -p "$LOGS" "$TMP/work"
DEADLINE=$((SECONDS + TIMEOUT))
T0=$SECONDS

# step NAME [--rc N] CMD...: run CMD under what is left of the budget, output to logs/NAME.log; a wrong
# exit code prints the log's tail and stops the script.
step() {
  local name="$1" want=0; shift
  if [ "$1" = "--rc" ]; then want="$2"; shift 2; fi
  local left=$((DEADLINE - SECONDS)) t=$SECONDS rc=0
  [ "$left" -gt 0 ] || die "out of time (--timeout $TIMEOUT) before '$name'"
  timeout --kill-after=20 "$left" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  if [ "$rc" != "$want" ]; then
    echo "compat: FAILED '$name' (exit $rc$([ "$rc" = 124 ] && echo ': timed out'), expected $want): $*" >&2
    tail -n 40 "$LOGS/$name.log" >&2
    exit 1
  fi
  printf '  %-24s %4d s\n' "$name" $((SECONDS - t))
}

echo "compat: $PY ($("$PY" -V 2>&1)), torch spec '$TORCH_SPEC'${DS_SPEC:+, $DS_SPEC}$([ "$FLOORS" = 1 ] && echo ', dependencies at their floors'), in $TMP"
VENV="$TMP/venv" VPY="$TMP/venv/bin/python"
export UV_PYTHON_DOWNLOADS=never  # the interpreter is the one found above, never a download
export DS_BUILD_OPS=0  # deepspeed as pure Python: its ops are JIT-built on first use, where needed
step build uv build --wheel -o "$TMP/dist" "$ROOT"
WHEEL="$(ls "$TMP"/dist/dat_ds-*.whl)"
step venv uv venv -q --python "$PY" "$VENV"
# The cluster's torch. setuptools and wheel build deepspeed's sdist against it (--no-build-isolation below).
# shellcheck disable=SC2086
step install-torch uv pip install --python "$VPY" $TORCH_SPEC setuptools wheel
TORCH_BEFORE="$("$VPY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"

install=(uv pip install --python "$VPY" --no-build-isolation-package deepspeed)
if [ "$FLOORS" = 1 ]; then
  # dat-ds's requirements as direct ones, so that lowest-direct takes each one's floor (torch is the cluster's)
  "$VPY" - "$WHEEL" >"$TMP/floors.txt" <<'EOF'
import re, sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
for line in wheel.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist:") and "extra ==" not in line:
        req = line.split(":", 1)[1].strip()
        if re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() not in ("torch", "torchvision"):
            print(req)
EOF
  install+=(--resolution lowest-direct -r "$TMP/floors.txt")
fi
# shellcheck disable=SC2086
step install-dat-ds "${install[@]}" $DS_SPEC "$WHEEL"
TORCH_AFTER="$("$VPY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
[ "$TORCH_BEFORE" = "$TORCH_AFTER" ] || die "installing dat-ds replaced torch/torchvision: $TORCH_BEFORE -> $TORCH_AFTER"
INSTALL_S=$((SECONDS - T0))

VERSIONS="$("$VPY" - <<'EOF' 2>/dev/null
import platform, importlib.metadata as md
print(f"python {platform.python_version()}, " + ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "torchvision", "deepspeed", "timm", "numpy", "pydantic", "datasets", "torchattacks", "rich",
       "safetensors", "matplotlib", "pyyaml")))
EOF
)"
echo "compat: $VERSIONS"

# The checks, as a user runs them: the venv's dat-ds from an empty folder, nothing of the checkout visible.
cd "$TMP/work"
unset VIRTUAL_ENV PYTHONPATH DAT_DS_VERBOSE
export PATH="$VENV/bin:$PATH" MPLBACKEND=Agg PYTHONUNBUFFERED=1
SHORT=(--epochs 1 --set train.max_steps_per_epoch=2 --set eval.max_examples=32)
step imports python -c 'import deepspeed, datasets, timm, torchattacks, dat_ds.runtime.trainer, dat_ds.attacks.external'
step help dat-ds --help
step train-help dat-ds train --help
step bad-config --rc 2 dat-ds train --recipe demo --set attack.eps=-1 --dry-run
grep -q '^error: attack.eps' "$LOGS/bad-config.log" || die "bad config: no one-line 'error: attack.eps ...' ($(head -c 300 "$LOGS/bad-config.log"))"
step train-1rank dat-ds train --recipe demo --name one "${SHORT[@]}"
step resume dat-ds train --recipe demo --name one --resume auto --epochs 2 --set train.max_steps_per_epoch=2 --set eval.max_examples=32
# a checkpoint this torch/deepspeed cannot verify or load is skipped with a warning: resuming must really resume
grep -q "resumed from " "$LOGS/resume.log" || die "resume: started from scratch ($(grep -m1 -i 'skipping\|warning' "$LOGS/resume.log"))"
step train-2ranks-zero3-bf16 dat-ds train --nproc 2 --recipe demo --name two --deepspeed_config zero3_bf16 "${SHORT[@]}"
step autoattack-32 dat-ds eval --run runs/two --attacks autoattack --max-examples 32 --nproc 2
for f in runs/one/summary.json runs/two/summary.json runs/two/eval.json; do [ -s "$f" ] || die "no $f"; done
"$VPY" - <<'EOF' || die "the runs' outputs are not what they should be"
import json
one, two = (json.load(open(f"runs/{n}/summary.json")) for n in ("one", "two"))
assert one["world_size"] == 1 and two["world_size"] == 2, (one["world_size"], two["world_size"])
assert json.load(open("runs/two/eval.json")), "empty eval.json"
EOF
echo "compat: OK in $((SECONDS - T0)) s (install $INSTALL_S s, checks $((SECONDS - T0 - INSTALL_S)) s): $VERSIONS"
