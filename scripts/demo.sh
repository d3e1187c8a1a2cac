#!/usr/bin/env bash
# The main job on the real path: the shipped handwritten digits written as image files
# (PNG, one subfolder per class), split over 4 devices by Dirichlet(0.5), plus a held-out
# folder for the hub. Each device is a `gkt-edge run --data FOLDER` process that adopts
# the hub's run spec, over a real Mosquitto broker started for you.
# Extra arguments go to `gkt-hub simulate`, e.g. `bash scripts/demo.sh --codec q4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
DATA=runs/demo-data
if [ ! -d "$DATA/held-out" ]; then
    echo "== writing the digits as PNG folders in $DATA (train/, held-out/)"
    .venv/bin/python -c "
from edge_runtime.learning.image_folders import write_digits
write_digits('$DATA/train', train=True)
write_digits('$DATA/held-out', train=False)"
fi
.venv/bin/gkt-hub simulate --transport mqtt --split-data "$DATA/train" \
    --test-data "$DATA/held-out" --image-size 8 --devices 4 --partition dirichlet:0.5 \
    --rounds 10 --json runs/demo.json "$@"
