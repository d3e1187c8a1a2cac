#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine: Mosquitto, a venv, torch, this package
# (with --test also what only the tests need).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "== installing Mosquitto (apt)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto mosquitto-clients
fi
# --test (scripts/test.sh): the status-page test renders in a real headless browser; the
# unit test runs systemd-analyze verify (the systemd package; it need not be the running init).
if [ "${1:-}" = "--test" ] && { ! command -v chromium >/dev/null 2>&1 || ! command -v systemd-analyze >/dev/null 2>&1; }; then
    echo "== installing Chromium and systemd-analyze (apt)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium systemd
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PY" -m venv .venv
fi
# An explicit torch line: a bare 'torch' would pull a multi-GB build on machines that
# have no local wheel. aarch64 (Raspberry Pi, Jetson) gets a CPU build.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "== installing torch"
    # The x86_64 wheel is a CUDA build (about 5.6 GB installed), the aarch64 one about 0.7 GB;
    # say so up front instead of failing half-way with pip's 'No space left on device'.
    need_mb=7000; [ "$(uname -m)" = "aarch64" ] && need_mb=1500
    free_mb=$(df -Pm .venv | awk 'NR==2 {print $4}')
    if [ "${free_mb:-0}" -lt "$need_mb" ]; then
        echo "error: torch needs about $need_mb MB free for .venv, but $(pwd) has $free_mb MB free;" \
             "free some disk space and run this again" >&2
        exit 1
    fi
    if [ "$(uname -m)" = "aarch64" ]; then
        .venv/bin/pip install -q "torch==2.9.1" "torchvision==0.24.1"
    else
        .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1"
    fi
fi
echo "== installing gkt-edge-toolkit[all,dev]"
.venv/bin/pip install -q -e ".[all,dev]"
