# Sourced by the launch scripts (dist_run.sh, slurm_run.sh), not run: sets PYTHON to the
# interpreter to launch with when the caller has not, and TOOLS to this folder. Nothing is
# activated on a fresh machine, so `python` on PATH is not the set-up one: the
# repository's .venv/bin/python (make setup creates it), else python3 from PATH, said.
TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_root=$(dirname "$TOOLS")
_launcher=${0##*/}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$_root/.venv/bin/python" ]; then
        PYTHON=$_root/.venv/bin/python
    elif PYTHON=$(command -v python3); then
        echo "$_launcher: no $_root/.venv/bin/python (make setup creates it); using" \
             "$PYTHON. Set PYTHON=/path/to/python to choose another." >&2
    else
        echo "$_launcher: no $_root/.venv/bin/python and no python3 on PATH: run make" \
             "setup, or set PYTHON=/path/to/python" >&2
        exit 1
    fi
fi
