#!/usr/bin/env bash
# The main job, from a fresh machine: installs what is missing
# (scripts/bootstrap.sh), then trains the 3D-conv video classifier with
# synchronized batch norm on 2 processes (configs/demo.yaml, a few minutes on
# 2 CPU cores) into a new run directory runs/demo-<time>. Extra arguments are
# config overrides, e.g. train.epochs=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/dist-bn-launch configs/demo.yaml "run.dir=runs/demo-$(date +%Y%m%d-%H%M%S)" "$@"
