#!/usr/bin/env bash
# Usage: tools/dist_test.sh CONFIG CHECKPOINT PROCS [test.py args, e.g. --deploy]
# PYTHON (default: the repository's .venv) and the rest: see tools/dist_run.sh.
set -euo pipefail
CONFIG=$1; CHECKPOINT=$2; PROCS=$3; shift 3
exec "$(dirname "$0")/dist_run.sh" "$PROCS" test.py "$CONFIG" "$CHECKPOINT" "$@"
