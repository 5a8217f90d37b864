#!/usr/bin/env bash
# The main job, from a fresh machine: installs what is missing
# (scripts/bootstrap.sh), then shows a 2-process run of SyncBatchNormalization.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TF_CPP_MIN_LOG_LEVEL=2
root=(); [[ $(id -u) == 0 ]] && root=(--allow-run-as-root)
exec mpirun "${root[@]}" -np 2 -H localhost:2 -bind-to none -map-by slot \
    .venv/bin/python examples/global_vs_local_statistics.py
