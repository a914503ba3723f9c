#!/usr/bin/env bash
# A folder of wheels for an air-gapped machine whose torch is already installed: dat-ds, deepspeed as a
# pure-Python wheel (DS_BUILD_OPS=0: py3-none-any, its ops JIT-built on first use, so it fits any torch and
# CUDA), and every other dependency at the version uv.lock pins, for the target Python and platform.
# torch, torchvision, triton, nvidia-* and cuda-* are left out: they are the cluster's own.
#
#   scripts/wheelhouse.sh --python 3.12 --out DIR [--platform x86_64|aarch64] [--minimal]
#   # on the cluster, into the environment that has torch:
#   pip install --no-index --find-links DIR dat-ds
#
#   --python V     target Python (3.10 ...), need not be installed here (default 3.12)
#   --out DIR      where the wheels go (created; existing wheels of the same names are replaced)
#   --platform P   target CPU, manylinux (default x86_64)
#   --minimal      only what a typical CUDA torch image lacks (deepspeed and its small dependencies,
#                  pydantic, hjson, torchattacks, dat-ds: ~12 MB); install those with `pip install --no-deps`
#                  (scripts/gpu_smoke.sh --wheels does), as the image's timm, datasets, ... are taken as given
# Needs uv, a python3 with pip, and network access to PyPI. Run from a checkout (it reads uv.lock).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYV=3.12 OUT="" ARCH=x86_64 MINIMAL=0
die() { echo "wheelhouse: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYV="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --platform) ARCH="$2"; shift 2 ;;
    --minimal) MINIMAL=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ -n "$OUT" ] || die "--out DIR is required"
[[ "$PYV" =~ ^3\.[0-9]+$ ]] || die "--python takes a version like 3.12, not '$PYV'"
command -v uv >/dev/null 2>&1 || die "needs uv (https://docs.astral.sh/uv/)"
PIP=(python3 -m pip)
"${PIP[@]}" --version >/dev/null 2>&1 || die "needs a python3 with pip (python3 -m pip)"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/dat-ds-wheelhouse.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# The cluster's GPU stack, never shipped.
THEIRS='^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)=='
# What a CUDA torch image typically lacks (the GPU smoke's kit): deepspeed's small dependencies, pydantic, ...
MINIMAL_SET='^(deepspeed|pydantic|pydantic-core|annotated-types|typing-inspection|typing-extensions|hjson|torchattacks|ninja|py-cpuinfo|msgpack|psutil|nvidia-ml-py|einops|packaging|tqdm)=='

# 1. The lock's versions for the target: export every locked requirement (with markers), resolve them for the
#    target Python/platform (all are ==, so nothing moves), then drop the GPU stack.
(cd "$ROOT" && uv export -q --frozen --no-dev --no-emit-project --no-hashes -o "$TMP/locked.txt")
(cd "$TMP" && uv pip compile -q --no-header --no-annotate --python-version "$PYV" \
  --python-platform "$ARCH-manylinux_2_28" locked.txt -o pins.txt)  # from $TMP: no project settings apply
grep -viE "$THEIRS" "$TMP/pins.txt" | grep -E '==' >"$TMP/wanted.txt" || true
[ "$MINIMAL" = 1 ] && { grep -iE "$MINIMAL_SET" "$TMP/wanted.txt" >"$TMP/m.txt" || true; mv "$TMP/m.txt" "$TMP/wanted.txt"; }
DS_VERSION="$(sed -n 's/^deepspeed==//p' "$TMP/wanted.txt")"
[ -n "$DS_VERSION" ] || die "no deepspeed pin for Python $PYV in uv.lock"
grep -v '^deepspeed==' "$TMP/wanted.txt" >"$TMP/binary.txt"

# 2. Binary wheels for the target (pure-Python ones fit any); --no-deps: the list is already the closure.
TAG="cp${PYV/./}"
"${PIP[@]}" download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$OUT" \
  --python-version "$PYV" --implementation cp --abi "$TAG" --abi abi3 --abi none \
  --platform "manylinux_2_28_$ARCH" --platform "manylinux_2_17_$ARCH" --platform "manylinux2014_$ARCH" \
  -r "$TMP/binary.txt" || die "pip download failed for Python $PYV/$ARCH (a package without a wheel for it?)"

# 3. deepspeed from its sdist, without torch in the build: DS_BUILD_OPS=0 gives a py3-none-any wheel that
#    records no compiled ops, so it never checks the torch/CUDA it was built with.
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --disable-pip-version-check --no-deps --no-binary deepspeed -w "$TMP/ds" \
  "deepspeed==$DS_VERSION" >"$TMP/ds.log" 2>&1 || { tail -20 "$TMP/ds.log" >&2; die "building deepspeed $DS_VERSION failed"; }
ls "$TMP"/ds/deepspeed-"$DS_VERSION"-py3-none-any.whl >/dev/null 2>&1 || die "deepspeed did not build as py3-none-any: $(ls "$TMP/ds")"
rm -f "$OUT"/deepspeed-*.whl "$OUT"/dat_ds-*.whl
cp "$TMP"/ds/deepspeed-*.whl "$OUT/"

# 4. dat-ds itself.
uv build -q --wheel -o "$OUT" "$ROOT"

n=$(ls "$OUT"/*.whl | wc -l)
echo "wheelhouse: $n wheels for Python $PYV/$ARCH in $OUT ($(du -sh "$OUT" | cut -f1)): deepspeed $DS_VERSION, $(ls "$OUT"/dat_ds-*.whl | xargs -n1 basename)"
if [ "$MINIMAL" = 1 ]; then
  echo "on the GPU machine, from a checkout:  scripts/gpu_smoke.sh --wheels $OUT"
else
  echo "install offline, next to the cluster's torch:  pip install --no-index --find-links $OUT dat-ds"
fi
