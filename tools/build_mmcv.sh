#!/usr/bin/env bash
# Builds the mmcv wheel with its compiled ops into a folder:
#   bash tools/build_mmcv.sh PYTHON VERSION OUT_DIR
# PYTHON is the interpreter of an environment that has torch (mmcv's setup.py imports it;
# no build isolation). MMCV_CUDA=1 adds the CUDA ops (a CUDA toolkit: CUDA_HOME or nvcc on
# PATH; archs from TORCH_CUDA_ARCH_LIST). MAX_JOBS sets the compile jobs (default: the
# usable cores, no more than the free memory holds: ~3 GB a job for nvcc). The build finds
# the ninja installed beside PYTHON without the environment being activated. The wheel
# appears in OUT_DIR only once complete. Used by tools/bootstrap.sh and
# tools/build_mmcv_cuda.sh.
set -euo pipefail
PYTHON="$1" VERSION="$2" OUT="$3"
ENV_PY="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mmrepvgg/env.py"
# PATH with PYTHON's folder first (torch's builder finds ninja only on PATH, and without it
# compiles one file after another, ignoring MAX_JOBS) and MAX_JOBS, from mmrepvgg/env.py
BUILD_ENV="$("$PYTHON" -c 'import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")' \
    "$ENV_PY" build-env $([ "${MMCV_CUDA:-0}" = 1 ] && echo --cuda))"
eval "$BUILD_ENV"
export PATH MAX_JOBS
echo "[build_mmcv] $BUILD_NOTE"
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
"$PYTHON" -m pip --disable-pip-version-check download -q --no-deps --no-binary :all: \
    --no-build-isolation "mmcv==$VERSION" -d "$BUILD"
tar -xzf "$BUILD/mmcv-$VERSION.tar.gz" -C "$BUILD"
SRC="$BUILD/mmcv-$VERSION"
# torch >= 2.14 headers need C++20; mmcv 2.1.0 hard-codes -std=c++17 (for both the host
# compiler and nvcc).
sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
# -g0: no debug info (Python's default flags ask for it): half the build time on 2 cores
( cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA="${MMCV_CUDA:-0}" CFLAGS="${CFLAGS:-} -g0" \
    "$PYTHON" -m pip --disable-pip-version-check wheel -q --no-deps --no-build-isolation . \
    -w "$BUILD/out" )
mkdir -p "$OUT"
for built in "$BUILD"/out/mmcv-*.whl; do
  cp "$built" "$OUT/.partial-$$" && mv "$OUT/.partial-$$" "$OUT/$(basename "$built")"
done
