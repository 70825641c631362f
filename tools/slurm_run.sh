#!/usr/bin/env bash
# Usage: tools/slurm_run.sh PARTITION JOB_NAME SCRIPT [args...]: tools/SCRIPT on GPUS
# tasks (one per GPU) with srun; mmengine's slurm launcher reads the ranks from SLURM_*.
set -euo pipefail
PARTITION=$1; JOB_NAME=$2; SCRIPT=$3; shift 3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="${CPUS_PER_TASK:-5}" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
    "${PYTHON:-python}" -u "$(dirname "$0")/$SCRIPT" "$@" --launcher slurm
