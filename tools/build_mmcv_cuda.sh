#!/usr/bin/env bash
# Shows that mmcv's CUDA ops compile against the pinned torch, on any machine (compiling
# needs no GPU), and writes the wheel where tools/bootstrap.sh looks for it on a GPU
# machine with the same archs:
#
#   bash tools/build_mmcv_cuda.sh                 # TORCH_CUDA_ARCH_LIST defaults to 9.0
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" bash tools/build_mmcv_cuda.sh
#
# Run tools/bootstrap.sh first (its .venv's torch is built against). The CUDA toolkit is
# $CUDA_HOME, else the one whose nvcc is on PATH, else pip's packages of torch's CUDA
# version (nvcc, crt, cccl, nvvm, runtime) gathered in a scratch folder. Long: tens of
# minutes per arch on 2 cores; not part of CI. The wheel is then loaded from a scratch
# folder: the CUDA version its ops were compiled for is printed, NMS and RoIAlign run on
# the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
MMCV_VERSION=2.1.0
[ -x "$PY" ] || { echo "run tools/bootstrap.sh first (no $PY)" >&2; exit 1; }
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
CUDA_VERSION="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
[ -n "$CUDA_VERSION" ] || { echo "the .venv's torch is a CPU-only build" >&2; exit 1; }
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  # the toolkit nvcc belongs to, as nvcc itself reports it (nvcc on PATH may be a wrapper)
  TOP="$(nvcc -v -x cu /dev/null -E 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
  CUDA_HOME="$(cd "$TOP" && pwd)"
fi
if [ -z "${CUDA_HOME:-}" ]; then
  echo "[build_mmcv_cuda] no CUDA toolkit here: installing pip's for CUDA $CUDA_VERSION"
  V="$CUDA_VERSION.*"
  "$PY" -m pip --disable-pip-version-check install -q --target "$SCRATCH/pip" \
      "nvidia-cuda-nvcc==$V" "nvidia-cuda-crt==$V" "nvidia-cuda-cccl==$V" "nvidia-nvvm==$V" \
      "nvidia-cuda-runtime==$V"
  CUDA_HOME="$(dirname "$(dirname "$(find "$SCRATCH/pip" -path '*/bin/nvcc' -type f | head -n1)")")"
  # torch's headers include the CUDA libraries' own (cusparse.h, cublas_v2.h, ...): those
  # come with torch's NVIDIA wheels, beside it; one CUDA_HOME gets both
  NVIDIA="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')"
  for part in include lib; do
    for entry in "$NVIDIA"/*/"$part"/*; do
      [ -e "$CUDA_HOME/$part/$(basename "$entry")" ] || ln -s "$entry" "$CUDA_HOME/$part/"
    done
  done
  # torch's extension builder links -L$CUDA_HOME/lib64 -lcudart
  ln -s lib "$CUDA_HOME/lib64"
  ln -sf "$(basename "$(ls "$CUDA_HOME"/lib/libcudart.so.* | head -n1)")" "$CUDA_HOME/lib/libcudart.so"
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
echo "[build_mmcv_cuda] CUDA_HOME=$CUDA_HOME ($(nvcc --version | tail -n1)), archs $TORCH_CUDA_ARCH_LIST"

DEVICE="cuda$CUDA_VERSION-sm${TORCH_CUDA_ARCH_LIST//[;. +]/_}"
TORCH_ID="$("$PY" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')"
OUT="${MMREPVGG_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmrepvgg/wheels}/mmcv-$MMCV_VERSION-$TORCH_ID-$DEVICE"
START=$SECONDS
MMCV_CUDA=1 bash "$ROOT/tools/build_mmcv.sh" "$PY" "$MMCV_VERSION" "$OUT"
WHEEL="$(ls "$OUT"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)"
echo "[build_mmcv_cuda] built $WHEEL ($(du -h "$WHEEL" | cut -f1)) in $((SECONDS - START)) s"

"$PY" -m pip --disable-pip-version-check install -q --no-deps --target "$SCRATCH/mmcv" "$WHEEL"
PYTHONPATH="$SCRATCH/mmcv" "$PY" - <<'PY'
import sys
import mmcv
from mmrepvgg.env import environment_checks
print(f'[build_mmcv_cuda] loaded {mmcv.__file__}')
checks = environment_checks(want_cuda=False, winograd=False)  # no GPU needed here
for check in checks:
    print(f"[build_mmcv_cuda] {'ok' if check.ok else 'FAILED'}: {check.name}: {check.detail}")
sys.exit(0 if all(check.ok for check in checks) else 1)
PY
