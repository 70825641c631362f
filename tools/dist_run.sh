#!/usr/bin/env bash
# Usage: tools/dist_run.sh PROCS SCRIPT [args...]: SCRIPT (a file of tools/, or a path) on
# PROCS processes with torchrun. PYTHON: the interpreter (default: the repository's
# .venv/bin/python, else python3 from PATH). Multi-node: set NNODES, NODE_RANK,
# MASTER_ADDR, PORT. On CPU, use the gloo backend:
#   --cfg-options env_cfg.dist_cfg.backend=gloo
set -euo pipefail
PROCS=$1; SCRIPT=$2; shift 2
TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$TOOLS")
if [ -z "${PYTHON:-}" ]; then
    # nothing activated on a fresh machine: `python` on PATH is not the set-up one
    if [ -x "$ROOT/.venv/bin/python" ]; then
        PYTHON=$ROOT/.venv/bin/python
    elif PYTHON=$(command -v python3); then
        echo "dist_run.sh: no $ROOT/.venv/bin/python (make setup creates it); using" \
             "$PYTHON. Set PYTHON=/path/to/python to choose another." >&2
    else
        echo "dist_run.sh: no $ROOT/.venv/bin/python and no python3 on PATH: run make" \
             "setup, or set PYTHON=/path/to/python" >&2
        exit 1
    fi
fi
case $SCRIPT in /*) ;; *) SCRIPT=$TOOLS/$SCRIPT ;; esac
exec "$PYTHON" -m torch.distributed.run --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$PROCS" --master_port="${PORT:-29500}" \
    "$SCRIPT" "$@" --launcher pytorch
