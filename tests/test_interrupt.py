"""Ctrl-C in a terminal: the signal goes to the whole foreground process group, so the test
starts each command in a group of its own and signals that group, as a shell would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from polling import wait_for


def processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line holds ``text`` (the run's state dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split(") ")[-1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def ctrl_c_after(argv: list[str], out: Path, ready: str) -> tuple[int, str]:
    """Start ``gkt-hub argv`` in a process group of its own, press Ctrl-C (SIGINT to the
    group, as a terminal does) once ``ready`` is in its output; (exit code, output)."""
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "server_hub.cli.main", *argv],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: ready in out.read_text(), timeout=240, interval=0.2), \
            out.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, out.read_text()


@pytest.mark.mqtt
def test_ctrl_c_stops_a_simulation_with_its_devices_and_broker(tmp_path):
    state = tmp_path / "state"
    rc, text = ctrl_c_after(["simulate", "--devices", "2", "--rounds", "50", "--server-epochs",
                             "1", "--state-dir", str(state), "--no-progress",
                             "--no-model-delivery"], tmp_path / "out.txt", "round 0: collect")
    assert rc == 130, text[-3000:]
    assert "stopped by Ctrl-C" in text
    assert "Traceback" not in text
    assert "restarting it" not in text  # the broker was not killed under the hub
    time.sleep(0.5)
    assert processes_naming(str(state)) == []  # no device or broker left behind
    for dev in ("dev0", "dev1"):  # stopped by the simulation, cleanly, progress saved
        assert "SIGTERM, stopping" in (state / "logs" / f"{dev}.log").read_text()


@pytest.mark.mqtt
def test_ctrl_c_stops_serve_cleanly_and_says_so(broker, tmp_path):
    rc, text = ctrl_c_after(["serve", "--broker", broker.url, "--state-dir",
                             str(tmp_path / "hub"), "--no-progress", "--dataset", "digits"],
                            tmp_path / "hub.txt", "waiting for devices: 0 of")
    assert rc == 0, text[-3000:]
    assert "SIGINT: stopping after the current step" in text
    assert "Traceback" not in text
