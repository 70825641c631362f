#!/usr/bin/env bash
# Usage: tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args, e.g. --deploy]
# The allocation as in tools/slurm_train.sh.
set -euo pipefail
PARTITION=$1; JOB_NAME=$2; shift 2
exec "$(dirname "$0")/slurm_run.sh" "$PARTITION" "$JOB_NAME" test.py "$@"
