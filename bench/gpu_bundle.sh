#!/usr/bin/env bash
# What bench/gpu_check.sh needs on a GPU machine that has PyTorch but no network, packed
# into ignored folders of this checkout (each is listed in .git/info/exclude):
#   .whl/  paho-mqtt and zstandard wheels for CPython 3.12 on x86-64 Linux
#   .mq/   this machine's mosquitto with the libraries it links, behind a wrapper that
#          shows them to mosquitto alone (glibc itself stays the target's)
#   .gpu/  the CIFAR-10 JPEG archive
# Usage: bash bench/gpu_bundle.sh [ARCHIVE]   (run from the repo root, on x86-64 Linux)
set -euo pipefail
TAR=${1:-../shared/data/cifar10-train-jpg.tar.gz}
mkdir -p .git/info .whl .mq/bin .mq/lib .gpu
for d in /.whl/ /.mq/ /.gpu/; do
    grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 -d .whl "paho-mqtt>=2.2" zstandard
bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
cp "$bin" .mq/bin/mosquitto.bin
ldd "$bin" | awk '/=>/ {print $3}' \
    | grep -vE '/(libc|libm|libpthread|libdl|librt|libresolv|ld-linux[^/]*)\.so' \
    | xargs -I{} cp -L {} .mq/lib/
cat >.mq/bin/mosquitto <<'EOF'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/../lib" exec "$here/mosquitto.bin" "$@"
EOF
chmod +x .mq/bin/mosquitto
cp "$TAR" .gpu/cifar10-train-jpg.tar.gz
du -sh .whl .mq .gpu
# On the GPU machine (device tool: carry .whl .mq .gpu), from the repo root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .
#   export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.mq/bin:$PATH
#   id mosquitto || useradd -r -M mosquitto
#   OUT=$OUT LIMIT=420 bash bench/gpu_check.sh
