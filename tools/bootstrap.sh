#!/usr/bin/env bash
# Creates .venv/ in the repo and installs the pinned, known-good OpenMMLab stack plus this
# project in editable mode. Safe to re-run: each finished step leaves a stamp, and the
# mmcv wheel built from source is cached per user (like pip's own wheel cache:
# $XDG_CACHE_HOME/mmrepvgg/wheels, or $MMREPVGG_WHEEL_CACHE), keyed by Python, torch build
# and the build's device, so a second clone on the same machine sets up in seconds.
#
# The decisions (can torch use this machine's GPUs, is the installed torch the build asked
# for, which CUDA toolkit, how many compile jobs) are taken by mmrepvgg/env.py, which needs
# only torch. Sourced, this file only defines its functions (main runs them in order).
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
# The build of the pinned torch that PyPI holds: what an empty TORCH_CUDA installs.
TORCH_CUDA_DEFAULT=cu130
TORCH_SOURCE=()
if [ -n "$TORCH_CUDA" ]; then
  TORCH_SOURCE=(--index-url "https://download.pytorch.org/whl/$TORCH_CUDA")
fi
MMENGINE_PIN="mmengine==0.10.7"
MMCV_VERSION="2.1.0"
MM_PINS="mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0"
# Runtime deps that mmseg/mmpretrain import lazily but their metadata does not declare.
EXTRA_PINS="ftfy regex pytest"
# The [deploy] extra: ONNX export, the CPU backends and NNCF (quantization-aware training).
DEPLOY_PINS="onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1 openvino==2026.4.1 nncf==3.4.0"
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
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
# mmrepvgg/env.py's commands, run as a file: the package itself needs what is not installed yet
env_py() {
  "$VENV/bin/python" -c 'import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")' \
    "$ROOT/mmrepvgg/env.py" "$@"
}

# Sets, from mmrepvgg/env.py's decisions for the installed torch: TORCH_MISMATCH (how it
# differs from the build asked for), else STOP (why the set-up cannot go on: GPUs torch
# cannot use, no CUDA toolkit to be had), else mmcv's plan: MMCV_CUDA, TORCH_CUDA_ARCH_LIST, MMCV_DEVICE, WHEELS (the cache
# folder), MMCV_WHEEL (cached, or empty: to build) and for a CUDA build CUDA_HOME (empty:
# pip's toolkit) and TOOLKIT_NOTE. mmcv's ops are compiled for CUDA where nvidia-smi
# lists a GPU (or FORCE_CUDA=1; FORCE_CUDA=0: CPU ops only), for the GPU archs of
# TORCH_CUDA_ARCH_LIST (default: the GPUs present, or without one a list of current data
# centre and desktop archs), with the installed CUDA toolkit where its major version is
# torch's, else pip's (tools/build_mmcv_cuda.sh; pip has CUDA 13's nvcc, not CUDA 12's).
decide() {
  local decisions
  decisions="$(env_py set-up "$TORCH_CUDA" "$TORCH_CUDA_DEFAULT" "$MMCV_VERSION")"
  TORCH_MISMATCH='' STOP='' TOOLKIT_NOTE=''
  eval "$decisions"
}

install_torch() {
  if ! stamp base; then
    step "install build tools and torch ($TORCH_PINS, ${TORCH_CUDA:-$TORCH_CUDA_DEFAULT} build)"
    pip_ install -q --upgrade pip "setuptools>=77,<81" wheel ninja
    pip_ install -q $TORCH_PINS "${TORCH_SOURCE[@]}"
    mark base
  fi
  decide
  # pip takes torch==2.14.1 as satisfied by any build of 2.14.1: a .venv set up with
  # another TORCH_CUDA keeps its torch unless it is replaced here
  if [ -n "$TORCH_MISMATCH" ]; then
    step "replace torch and torchvision: $TORCH_MISMATCH"
    pip_ install -q --force-reinstall --no-deps $TORCH_PINS "${TORCH_SOURCE[@]}"
    pip_ install -q $TORCH_PINS "${TORCH_SOURCE[@]}"  # the new build's own dependencies
    decide
    if [ -n "$TORCH_MISMATCH" ]; then
      echo "[bootstrap] torch was reinstalled, yet $TORCH_MISMATCH: check pip's index" \
           "settings (pip config list) for one that serves another build first" >&2
      exit 1
    fi
    # Whatever was installed or built against the old torch is redone: every step runs
    # again (mmcv's wheel and the Winograd op are cached per torch build).
    rm -f "$VENV"/.stamp-*
    mark base
  fi
}

# Before anything is built: NVML may count GPUs that torch's CUDA runtime cannot start
# on (a driver older than torch's CUDA), and every CUDA step after would fail. A CUDA build
# says here which toolkit compiles it.
check_gpus() {
  if [ -n "$STOP" ]; then
    echo "[bootstrap] stopped before building anything: $STOP" >&2
    exit 1
  fi
  [ -z "$TOOLKIT_NOTE" ] || echo "[bootstrap] $TOOLKIT_NOTE"
}

build_mmcv() {
  [ -z "$MMCV_WHEEL" ] || return 0
  if [ "$MMCV_CUDA" = 1 ]; then
    step "build mmcv $MMCV_VERSION from source with its CPU and CUDA ops for GPU archs $TORCH_CUDA_ARCH_LIST (long: tens of minutes per arch on 2 cores)"
    TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" CUDA_HOME="$CUDA_HOME" \
      bash "$ROOT/tools/build_mmcv_cuda.sh" --for-bootstrap
  else
    step "build mmcv $MMCV_VERSION from source with its CPU ops (several minutes on 2 cores)"
    MMCV_CUDA=0 bash "$ROOT/tools/build_mmcv.sh" "$VENV/bin/python" "$MMCV_VERSION" "$WHEELS"
  fi
  MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)"
}

main() {
  if [ ! -x "$VENV/bin/python" ]; then
    step "create virtual environment $VENV"
    "$PY" -m venv "$VENV"
  fi
  install_torch
  check_gpus

  if ! stamp mmengine; then
    step "install $MMENGINE_PIN"
    pip_ install -q "$MMENGINE_PIN"
    mark mmengine
  fi

  mkdir -p "$WHEELS"
  build_mmcv

  if ! stamp "mmcv-$MMCV_DEVICE"; then
    step "install mmcv wheel $MMCV_WHEEL"
    # forced: the wheel of another device may be installed under the same version
    pip_ install -q --no-deps --force-reinstall "$MMCV_WHEEL"
    rm -f "$VENV"/.stamp-mmcv-*"-$STACK_ID"
    pip_ install -q addict packaging Pillow pyyaml yapf opencv-python
    mark "mmcv-$MMCV_DEVICE"
  fi

  if ! stamp mm; then
    step "install $MM_PINS and runtime deps"
    pip_ install -q $MM_PINS $EXTRA_PINS "mmcv==$MMCV_VERSION" --find-links "$WHEELS"
    mark mm
  fi

  if [ ! -f "$VENV/.stamp-deploy-$STACK_ID-$DEPLOY_ID" ]; then
    step "install the deploy extra ($DEPLOY_PINS)"
    pip_ install -q $DEPLOY_PINS
    touch "$VENV/.stamp-deploy-$STACK_ID-$DEPLOY_ID"
  fi

  if [ ! -f "$VENV/.stamp-test-$STACK_ID-$TEST_ID" ]; then
    step "install the test runner's extras ($TEST_PINS)"
    pip_ install -q $TEST_PINS
    touch "$VENV/.stamp-test-$STACK_ID-$TEST_ID"
  fi

  if ! stamp project || [ "$ROOT/setup.py" -nt "$VENV/.stamp-project-$STACK_ID" ]; then
    step "install mmrepvgg (editable)"
    pip_ install -q --no-deps --no-build-isolation -e "$ROOT"
    mark project
  fi

  # Built for this CPU (-march=native) into torch's extension cache (a folder per torch
  # build); rebuilt when its source changes. Without a C++ compiler Winograd convs fall
  # back to torch ops (slower).
  step "build the C++ Winograd kernel"
  "$VENV/bin/python" -c 'import sys; from mmrepvgg.ops.winograd_kernel import main; sys.exit(main())' \
    || echo "[bootstrap] warning: the Winograd kernel did not build; Winograd convs will use torch ops" >&2

  # NNCF compiles its fake-quantization kernels on first use (torch's extension cache,
  # once per torch build): here, so that the first --qat run does not wait for it.
  step "build NNCF's CPU fake-quantization kernels"
  "$VENV/bin/python" -c 'import nncf.torch; nncf.torch.force_build_cpu_extensions()' >/dev/null 2>&1 \
    || echo "[bootstrap] warning: NNCF's CPU kernels did not build; quantization-aware training will use its torch ops" >&2

  step "check the stack imports"
  "$VENV/bin/python" - <<'PY'
import torch, torchvision, mmengine, mmcv, mmcv.ops, mmdet, mmseg, mmpretrain, mmrepvgg
import onnx, onnxscript, onnxruntime, openvino, nncf
from torchvision.ops import nms  # torchvision's compiled ops must load
print(f"[bootstrap] ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, "
      f"mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}, mmrepvgg {mmrepvgg.__version__}, "
      f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}, "
      f"nncf {nncf.__version__}")
PY

  step "check mmcv's ops (on the GPU too, where this machine has one)"
  "$VENV/bin/python" - <<'PY'
import sys
from mmrepvgg.env import environment_checks
checks = environment_checks()  # the Winograd op was reported above
for check in checks:
    print(f"[bootstrap] {'ok' if check.ok else 'FAILED'}: {check.name}: {check.detail}")
sys.exit(0 if all(check.ok for check in checks) else 1)
PY
  echo "[bootstrap] set-up done in $((SECONDS - START)) s"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
