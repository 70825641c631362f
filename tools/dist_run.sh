#!/usr/bin/env bash
# Usage: tools/dist_run.sh PROCS SCRIPT [args...]: SCRIPT (a file of tools/, or a path) on
# PROCS processes with torchrun. PYTHON: the interpreter (default: the repository's
# .venv/bin/python, else python3 from PATH). Multi-node: set NNODES, NODE_RANK,
# MASTER_ADDR, PORT. On CPU, use the gloo backend:
#   --cfg-options env_cfg.dist_cfg.backend=gloo
set -euo pipefail
PROCS=$1; SCRIPT=$2; shift 2
source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh"
case $SCRIPT in /*) ;; *) SCRIPT=$TOOLS/$SCRIPT ;; esac
exec "$PYTHON" -m torch.distributed.run --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$PROCS" --master_port="${PORT:-29500}" \
    "$SCRIPT" "$@" --launcher pytorch
