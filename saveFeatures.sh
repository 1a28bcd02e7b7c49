#!/bin/bash
# The handout's one command for Part 2: write the 12 extraction jobs and submit them (PBS by default).
#   ./saveFeatures.sh                                  # qsub 12 jobs
#   ./saveFeatures.sh --scheduler slurm -- --split 2   # options: python generate_pbs.py --help
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" generate_pbs.py "$@"
