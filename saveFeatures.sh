#!/bin/bash
# The handout's one command for Part 2: write the 12 extraction jobs and submit them (PBS by default).
# Run it from the folder that holds the data; the code may live elsewhere (the jobs run where you submit them).
#   ./saveFeatures.sh                                  # qsub 12 jobs
#   ./saveFeatures.sh --scheduler slurm -- --split 2   # options: python generate_pbs.py --help
set -euo pipefail
code="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$code/.venv/bin/python" ]; then PYTHON="$code/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" "$code/generate_pbs.py" "$@"
