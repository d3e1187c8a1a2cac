#!/usr/bin/env bash
# The CUDA hub check, one prepared script (docs/uplink.md, "On a GPU"): run from the repo
# root of a machine with a GPU, a mosquitto and this package installed.
#  1. bench/bench_hub_gpu.py: ResNet-55 training samples/s, with and without bf16 autocast
#     and channels-last (while the CIFAR-10 archive is unpacked on the CPU);
#  2. all 50,000 CIFAR-10 training images: 1,000 drawn at random held out at the hub, the
#     other 49,000 split over 4 device folders (Dirichlet 0.5), then `gkt-hub simulate`
#     over real MQTT (broker, CUDA hub, 4 gkt-edge processes on the CPU) for the default
#     (q4, freeze:1) and GKT fp32 (full) at once, each cut off after LIMIT seconds.
# Environment: OUT (results), TAR, DEVICE (cuda), ROUNDS (8), LIMIT (s), N_TRAIN (49000),
# N_TEST (1000: held out at the hub), HUB_BENCH (extra bench_hub_gpu.py flags), PY.
set -u
OUT=${OUT:-/tmp/gpu-check}
TAR=${TAR:-.gpu/cifar10-train-jpg.tar.gz}
DEVICE=${DEVICE:-cuda}
ROUNDS=${ROUNDS:-8}
LIMIT=${LIMIT:-440}
N_TRAIN=${N_TRAIN:-49000}
N_TEST=${N_TEST:-1000}
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu-check-work}
mkdir -p "$OUT" "$WORK"
stamp() { echo "[$(date +%T)] $*"; }

stamp "unpacking $TAR ($N_TRAIN training, $N_TEST held out) while the GPU benchmark runs"
# the same seeded draw as `bench_uplink.py --images TAR --train-images N --test-images M`
$PY -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path
from bench_uplink import extract_images
extract_images(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), 0)
print('unpacked', flush=True)" "$TAR" "$WORK" "$N_TRAIN" "$N_TEST" >"$WORK/data.log" 2>&1 &
unpack=$!
# shellcheck disable=SC2086
$PY bench/bench_hub_gpu.py --device "$DEVICE" ${HUB_BENCH:-} --json "$OUT/hub_gpu.json" 2>&1
wait $unpack
cat "$WORK/data.log"
$PY -m server_hub.cli.main split-data "$WORK/train" "$WORK/split" --devices 4 \
    --partition dirichlet:0.5 --seed 0 2>&1 | tail -3

stamp "two runs at once over MQTT, $ROUNDS rounds, cut off after $LIMIT s"
for row in q4/freeze:1 fp32/full; do
    name=${row%%/*}
    # shellcheck disable=SC2046
    timeout -s INT "$LIMIT" $PY -m server_hub.cli.main simulate --transport mqtt \
        $(for d in "$WORK"/split/device-*; do echo --device-data "$d"; done) \
        --test-data "$WORK/test" --rounds "$ROUNDS" --server-epochs 1 --batch-size 64 \
        --seed 0 --device "$DEVICE" --codec "$name" --refresh "${row#*/}" \
        --no-progress --no-model-delivery --state-dir "$WORK/run-$name" \
        --json "$OUT/sim-$name.json" >"$OUT/sim-$name.log" 2>&1 &
done
wait
for name in q4 fp32; do
    stamp "$name: last lines"
    tail -4 "$OUT/sim-$name.log"
done
# every process's log (hub, devices, broker): the hub's per-round lines survive a cut-off run
tar czf "$OUT/logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls -d run-*/logs run-*/broker/*.log 2>/dev/null)
ls -la "$OUT"
stamp done
