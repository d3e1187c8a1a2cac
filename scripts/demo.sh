#!/usr/bin/env bash
# The main job: a 4-device GKT federation on real data (scikit-learn's digits,
# Dirichlet(0.5) split) over a real Mosquitto broker started for you.
# Extra arguments go to `gkt-hub simulate`, e.g. `bash scripts/demo.sh --codec q4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/gkt-hub simulate --transport mqtt --dataset digits --devices 4 \
    --partition dirichlet:0.5 --rounds 10 --codec q8 --json runs/demo.json "$@"
