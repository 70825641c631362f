#!/usr/bin/env bash
# Usage: tools/dist_run.sh PROCS SCRIPT [args...]: SCRIPT on PROCS processes with torchrun.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, PORT. On CPU, use the gloo backend:
#   --cfg-options env_cfg.dist_cfg.backend=gloo
set -euo pipefail
PROCS=$1; SCRIPT=$2; shift 2
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$PROCS" --master_port="${PORT:-29500}" \
    "$(dirname "$0")/$SCRIPT" "$@" --launcher pytorch
