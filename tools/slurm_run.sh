#!/usr/bin/env bash
# Usage: tools/slurm_run.sh PARTITION JOB_NAME SCRIPT [args...]: SCRIPT (a file of tools/,
# or a path) on GPUS tasks (one per GPU) with srun; mmengine's slurm launcher reads the
# ranks from SLURM_*.
# PYTHON: the interpreter (default: the repository's .venv/bin/python, else python3).
# MASTER_PORT: the rendezvous port; default one derived from the job and step ids, so
# jobs sharing a node do not collide (set it if that port is taken).
# RECORD_ENV=FILE: the first task writes its node's environment there (JSON) first.
set -euo pipefail
PARTITION=$1; JOB_NAME=$2; SCRIPT=$3; shift 3
source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh"
case $SCRIPT in /*) ;; *) SCRIPT=$TOOLS/$SCRIPT ;; esac
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
# What each task runs, on its node: the port every task of the step agrees on (from
# ids they share; 10000-29999, below Linux's ephemeral ports), the record, the script.
TASK='
if [ -z "${MASTER_PORT:-}" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    export MASTER_PORT=$(( 10000 + (SLURM_JOB_ID % 2000) * 10 + ${SLURM_STEP_ID:-0} % 10 ))
fi
if [ -n "${RECORD_ENV:-}" ] && [ "${SLURM_PROCID:-0}" = 0 ]; then
    "$1" -m mmrepvgg.reproduce.preflight --record "$RECORD_ENV" ||
        echo "slurm_run.sh: could not write this node'"'"'s environment to $RECORD_ENV" >&2
fi
exec "$@"'
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="${CPUS_PER_TASK:-5}" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
    bash -c "$TASK" slurm-task "$PYTHON" -u "$SCRIPT" "$@" --launcher slurm
