#!/usr/bin/env bash
# Usage: tools/dist_train.sh CONFIG PROCS [train.py args...]
# PYTHON (default: the repository's .venv), NNODES, NODE_RANK, MASTER_ADDR, PORT: see
# tools/dist_run.sh.
set -euo pipefail
CONFIG=$1; PROCS=$2; shift 2
exec "$(dirname "$0")/dist_run.sh" "$PROCS" train.py "$CONFIG" "$@"
