#!/usr/bin/env bash
# Usage: tools/slurm_train.sh PARTITION JOB_NAME CONFIG [train.py args...]
# GPUS (default 8), GPUS_PER_NODE (default 8), CPUS_PER_TASK (default 5) and SRUN_ARGS
# set the allocation; one task per GPU, each started with --launcher slurm. PYTHON
# (default: the repository's .venv), MASTER_PORT (default: from the job id) and
# RECORD_ENV: see tools/slurm_run.sh.
set -euo pipefail
PARTITION=$1; JOB_NAME=$2; shift 2
exec "$(dirname "$0")/slurm_run.sh" "$PARTITION" "$JOB_NAME" train.py "$@"
