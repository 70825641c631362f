#!/usr/bin/env bash
# Creates .venv/ in the repo and installs the pinned, known-good OpenMMLab stack plus this
# project in editable mode. Safe to re-run: each finished step leaves a stamp, and the
# mmcv wheel built from source is cached per user (like pip's own wheel cache:
# $XDG_CACHE_HOME/mmrepvgg/wheels, or $MMREPVGG_WHEEL_CACHE), keyed by Python, torch and
# the build's device, so a second clone on the same machine sets up in seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

# The pinned stack. torch 2.13's CPU wheel has no torchvision whose ops load, so we take
# the CUDA build of 2.14.1 (it runs on CPU) with its matching torchvision. That build is
# CUDA 13.0 and needs an NVIDIA driver >= 580; TORCH_CUDA=cu128 (or cu126, ...) takes
# PyTorch's build for that CUDA instead, which CUDA 12 drivers (>= 525.60) run.
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
TORCH_CUDA="${TORCH_CUDA:-}"
TORCH_SOURCE=()
if [ -n "$TORCH_CUDA" ]; then
  TORCH_SOURCE=(--index-url "https://download.pytorch.org/whl/$TORCH_CUDA")
fi
MMENGINE_PIN="mmengine==0.10.7"
MMCV_VERSION="2.1.0"
MM_PINS="mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0"
# Runtime deps that mmseg/mmpretrain import lazily but their metadata does not declare.
EXTRA_PINS="ftfy regex pytest"
# The [deploy] extra: ONNX export and the CPU backends.
DEPLOY_PINS="onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1 openvino==2026.4.1"
# What the test suite runs with: two worker processes share the cores (see Makefile).
TEST_PINS="pytest-xdist==3.8.0"
# The deploy and test pins are not part of the stack id: adding them must not rebuild the rest.
STACK_ID="$(echo "$PY $TORCH_PINS $TORCH_CUDA $MMENGINE_PIN mmcv==$MMCV_VERSION $MM_PINS $EXTRA_PINS" | sha1sum | cut -c1-12)"
DEPLOY_ID="$(echo "$DEPLOY_PINS" | sha1sum | cut -c1-12)"
TEST_ID="$(echo "$TEST_PINS" | sha1sum | cut -c1-12)"

START=$SECONDS
STEP_START=$SECONDS
step() {
  [ -z "${CURRENT_STEP:-}" ] || echo "[bootstrap]   took $((SECONDS - STEP_START)) s"
  CURRENT_STEP="$1"; STEP_START=$SECONDS; echo "[bootstrap] $1"
}
trap 'echo "[bootstrap] FAILED at step: ${CURRENT_STEP:-start} (see output above)" >&2' ERR
stamp() { [ -f "$VENV/.stamp-$1-$STACK_ID" ]; }
mark() { touch "$VENV/.stamp-$1-$STACK_ID"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "create virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! stamp base; then
  step "install build tools and torch ($TORCH_PINS)"
  "${PIP[@]}" install -q --upgrade pip "setuptools>=77,<81" wheel ninja
  "${PIP[@]}" install -q $TORCH_PINS "${TORCH_SOURCE[@]}"
  mark base
fi

if ! stamp mmengine; then
  step "install $MMENGINE_PIN"
  "${PIP[@]}" install -q "$MMENGINE_PIN"
  mark mmengine
fi

# mmcv's ops are compiled for CUDA where a GPU answers nvidia-smi (or FORCE_CUDA=1; a CUDA
# toolkit is then needed: CUDA_HOME, nvcc on PATH, or tools/build_mmcv_cuda.sh's pip one),
# for the GPU archs of TORCH_CUDA_ARCH_LIST (default: the GPUs present, or without one a
# list of current data-centre and desktop archs). FORCE_CUDA=0 builds for the CPU only.
if [ "${FORCE_CUDA:-}" = 1 ] || { [ "${FORCE_CUDA:-}" != 0 ] \
     && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  MMCV_CUDA=1
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$VENV/bin/python" - <<'PY'
import torch
archs = sorted({'%d.%d' % torch.cuda.get_device_capability(i)
                for i in range(torch.cuda.device_count())})
# without a usable GPU, the archs torch 2.14.1's CUDA build itself targets: Turing to
# Blackwell, data centre and desktop
print(';'.join(archs) if archs else '7.5;8.0;8.6;9.0;10.0;12.0')
PY
)"
  fi
  export TORCH_CUDA_ARCH_LIST
  MMCV_DEVICE="cuda$("$VENV/bin/python" -c 'import torch; print(torch.version.cuda or "")')-sm${TORCH_CUDA_ARCH_LIST//[;. +]/_}"
else
  MMCV_CUDA=0
  MMCV_DEVICE=cpu
fi
# A wheel is only valid for the torch it was compiled against and its ops for the device
# (and GPU archs) they were built for: the cache folder says which, so a CPU wheel is
# never installed on a GPU machine, nor the reverse.
TORCH_ID="$("$VENV/bin/python" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')"
WHEELS="${MMREPVGG_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmrepvgg/wheels}/mmcv-$MMCV_VERSION-$TORCH_ID-$MMCV_DEVICE"
mkdir -p "$WHEELS"
MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$MMCV_WHEEL" ]; then
  if [ "$MMCV_CUDA" = 1 ]; then
    step "build mmcv $MMCV_VERSION from source with its CPU and CUDA ops for GPU archs $TORCH_CUDA_ARCH_LIST (long: tens of minutes per arch on 2 cores; needs a CUDA toolkit, CUDA_HOME or nvcc on PATH: without one, tools/build_mmcv_cuda.sh builds this wheel with pip's)"
  else
    step "build mmcv $MMCV_VERSION from source with its CPU ops (several minutes on 2 cores)"
  fi
  MMCV_CUDA="$MMCV_CUDA" bash "$ROOT/tools/build_mmcv.sh" "$VENV/bin/python" "$MMCV_VERSION" \
      "$WHEELS"
  MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)"
fi

if ! stamp "mmcv-$MMCV_DEVICE"; then
  step "install mmcv wheel $MMCV_WHEEL"
  # forced: the wheel of another device may be installed under the same version
  "${PIP[@]}" install -q --no-deps --force-reinstall "$MMCV_WHEEL"
  rm -f "$VENV"/.stamp-mmcv-*"-$STACK_ID"
  "${PIP[@]}" install -q addict packaging Pillow pyyaml yapf opencv-python
  mark "mmcv-$MMCV_DEVICE"
fi

if ! stamp mm; then
  step "install $MM_PINS and runtime deps"
  "${PIP[@]}" install -q $MM_PINS $EXTRA_PINS "mmcv==$MMCV_VERSION" --find-links "$WHEELS"
  mark mm
fi

if [ ! -f "$VENV/.stamp-deploy-$STACK_ID-$DEPLOY_ID" ]; then
  step "install the deploy extra ($DEPLOY_PINS)"
  "${PIP[@]}" install -q $DEPLOY_PINS
  touch "$VENV/.stamp-deploy-$STACK_ID-$DEPLOY_ID"
fi

if [ ! -f "$VENV/.stamp-test-$STACK_ID-$TEST_ID" ]; then
  step "install the test runner's extras ($TEST_PINS)"
  "${PIP[@]}" install -q $TEST_PINS
  touch "$VENV/.stamp-test-$STACK_ID-$TEST_ID"
fi

if ! stamp project || [ "$ROOT/setup.py" -nt "$VENV/.stamp-project-$STACK_ID" ]; then
  step "install mmrepvgg (editable)"
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"
  mark project
fi

# Built for this CPU (-march=native) into torch's extension cache; rebuilt when its source
# changes. Without a C++ compiler Winograd convs fall back to torch ops (slower).
step "build the C++ Winograd kernel"
"$VENV/bin/python" -c 'import sys; from mmrepvgg.ops.winograd_kernel import main; sys.exit(main())' \
  || echo "[bootstrap] warning: the Winograd kernel did not build; Winograd convs will use torch ops" >&2

step "check the stack imports"
"$VENV/bin/python" - <<'PY'
import torch, torchvision, mmengine, mmcv, mmcv.ops, mmdet, mmseg, mmpretrain, mmrepvgg
import onnx, onnxscript, onnxruntime, openvino
from torchvision.ops import nms  # torchvision's compiled ops must load
print(f"[bootstrap] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, "
      f"mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}, mmrepvgg {mmrepvgg.__version__}, "
      f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}")
PY

step "check mmcv's ops (on the GPU too, where this machine has one)"
"$VENV/bin/python" - <<'PY'
import sys
from mmrepvgg.env import environment_checks
checks = environment_checks(winograd=False)  # the Winograd op was reported above
for check in checks:
    print(f"[bootstrap] {'ok' if check.ok else 'FAILED'}: {check.name}: {check.detail}")
sys.exit(0 if all(check.ok for check in checks) else 1)
PY
echo "[bootstrap] set-up done in $((SECONDS - START)) s"
