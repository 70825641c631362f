#!/usr/bin/env bash
# Shows that mmcv's CUDA ops compile against the pinned torch, on any machine (compiling
# needs no GPU), and writes the wheel where tools/bootstrap.sh looks for it on a GPU
# machine with the same archs:
#
#   bash tools/build_mmcv_cuda.sh                 # TORCH_CUDA_ARCH_LIST defaults to 9.0
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" bash tools/build_mmcv_cuda.sh
#
# Run tools/bootstrap.sh first (its .venv's torch is built against). The CUDA toolkit is
# the installed one ($CUDA_HOME, else the one whose nvcc is on PATH, else /usr/local/cuda)
# where its major version is torch's CUDA's (torch's builder refuses another), else pip's
# packages of torch's CUDA version gathered in a scratch folder (nvcc, crt, cccl, nvvm,
# runtime: CUDA 13 only, pip's CUDA 12 packages hold no nvcc); one line says which. Long:
# tens of minutes per arch on 2 cores; not part of CI. The wheel is then loaded from a
# scratch folder: the CUDA version its ops were compiled for is printed, NMS and RoIAlign
# run on the CPU.
#
# --for-bootstrap (tools/bootstrap.sh, which chose and named the toolkit): CUDA_HOME as
# given, empty for pip's; no load check (the set-up checks the installed wheel).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
MMCV_VERSION=2.1.0
FOR_BOOTSTRAP=0
[ "${1:-}" != --for-bootstrap ] || FOR_BOOTSTRAP=1
[ -x "$PY" ] || { echo "run tools/bootstrap.sh first (no $PY)" >&2; exit 1; }
env_py() {
  "$PY" -c 'import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")' \
    "$ROOT/mmrepvgg/env.py" "$@"
}
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
CUDA_VERSION="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
[ -n "$CUDA_VERSION" ] || { echo "the .venv's torch is a CPU-only build: set it up with a CUDA build (TORCH_CUDA=cu128 or cu130, or unset)" >&2; exit 1; }
CUDA_MAJOR="${CUDA_VERSION%%.*}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

if [ "$FOR_BOOTSTRAP" = 0 ]; then
  TOOLKIT="$(env_py cuda-toolkit)"
  eval "$TOOLKIT"  # CUDA_HOME: the installed toolkit, empty for pip's; TOOLKIT_NOTE
  echo "[build_mmcv_cuda] $TOOLKIT_NOTE"
fi
if [ -z "${CUDA_HOME:-}" ]; then
  # pip's CUDA toolkit, CUDA 13's (unsuffixed names). pip's CUDA 12 packages
  # (nvidia-cuda-nvcc-cu12) hold ptxas and NVVM but no nvcc: CUDA 12 needs an installed
  # toolkit.
  if [ "$CUDA_MAJOR" != 13 ]; then
    echo "[build_mmcv_cuda] pip has no CUDA $CUDA_MAJOR nvcc: install a CUDA $CUDA_MAJOR" \
         "toolkit and set CUDA_HOME to it" >&2
    exit 1
  fi
  V="$CUDA_VERSION.*"
  PACKAGES=("nvidia-cuda-nvcc==$V" "nvidia-cuda-crt==$V" "nvidia-cuda-cccl==$V"
            "nvidia-nvvm==$V" "nvidia-cuda-runtime==$V")
  echo "[build_mmcv_cuda] installing pip's CUDA $CUDA_VERSION toolkit: ${PACKAGES[*]}"
  "$PY" -m pip --disable-pip-version-check install -q --target "$SCRATCH/pip" "${PACKAGES[@]}"
  CUDA_HOME="$(dirname "$(dirname "$(find "$SCRATCH/pip" -path '*/bin/nvcc' -type f | head -n1)")")"
  # One CUDA_HOME must hold every header and library: the other toolkit packages' and
  # the CUDA libraries' that torch's headers include (cusparse.h, cublas_v2.h, ...), which
  # come with torch's NVIDIA wheels, beside it.
  NVIDIA="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')"
  for part in include lib; do
    mkdir -p "$CUDA_HOME/$part"
    for entry in "$SCRATCH"/pip/nvidia/*/"$part"/* "$NVIDIA"/*/"$part"/*; do
      [ -e "$entry" ] || continue
      [ -e "$CUDA_HOME/$part/$(basename "$entry")" ] || ln -s "$entry" "$CUDA_HOME/$part/"
    done
  done
  # torch's extension builder links -L$CUDA_HOME/lib64 -lcudart
  [ -e "$CUDA_HOME/lib64" ] || ln -s lib "$CUDA_HOME/lib64"
  ln -sf "$(basename "$(ls "$CUDA_HOME"/lib/libcudart.so.* | head -n1)")" "$CUDA_HOME/lib/libcudart.so"
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
echo "[build_mmcv_cuda] CUDA_HOME=$CUDA_HOME ($(nvcc --version | tail -n1)), archs $TORCH_CUDA_ARCH_LIST"

PLAN="$(FORCE_CUDA=1 env_py mmcv-plan "$MMCV_VERSION")"
eval "$PLAN"  # WHEELS: the cache folder tools/bootstrap.sh looks in
START=$SECONDS
MMCV_CUDA=1 bash "$ROOT/tools/build_mmcv.sh" "$PY" "$MMCV_VERSION" "$WHEELS"
WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)"
echo "[build_mmcv_cuda] built $WHEEL ($(du -h "$WHEEL" | cut -f1)) in $((SECONDS - START)) s"
[ "$FOR_BOOTSTRAP" = 0 ] || exit 0

"$PY" -m pip --disable-pip-version-check install -q --no-deps --target "$SCRATCH/mmcv" "$WHEEL"
PYTHONPATH="$SCRATCH/mmcv" "$PY" - <<'PY'
import sys
import mmcv
from mmrepvgg.env import environment_checks
print(f'[build_mmcv_cuda] loaded {mmcv.__file__}')
checks = environment_checks(want_cuda=False)  # no GPU needed here
for check in checks:
    print(f"[build_mmcv_cuda] {'ok' if check.ok else 'FAILED'}: {check.name}: {check.detail}")
sys.exit(0 if all(check.ok for check in checks) else 1)
PY
