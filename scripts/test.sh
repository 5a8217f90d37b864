#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing
# (scripts/bootstrap.sh), then runs pytest, mpirun/horovodrun tests included.
# Extra arguments go to pytest (e.g. -k mpirun).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest tests "$@"
