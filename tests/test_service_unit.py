"""`gkt-edge service`: the systemd unit, checked by systemd itself, and acted out.

This sandbox (like most CI containers) does not run systemd as init, so the restart test
plays systemd's part: it runs the unit's own ExecStart line and applies its Restart=,
RestartSec= and RestartPreventExitStatus= exactly as systemd documents them. The device
process is SIGKILLed mid-run, restarted on the same state dir, and must resume.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_mqtt_federation import make_hub, run_threads

from edge_runtime.device import cli as edge_cli
from edge_runtime.protocol import wire
from server_hub.cli import main as hub_cli


def unit_for(config: Path, capsys, *extra: str) -> str:
    assert edge_cli.main(["service", "--config", str(config), *extra]) == 0
    return capsys.readouterr().out


def parse_unit(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines()
                if "=" in line and not line.startswith(("#", "[")))


def test_unit_passes_systemd_analyze_verify(tmp_path, capsys):
    cfg = tmp_path / "edge.toml"
    cfg.write_text('hub = "mqtt://10.0.0.5:1883"\ndevice-id = "pi-1"\n')
    text = unit_for(cfg, capsys, "--user", "root")
    unit = parse_unit(text)
    exe, *rest = shlex.split(unit["ExecStart"])
    assert Path(exe).is_absolute() and os.access(exe, os.X_OK) and Path(exe).name == "gkt-edge"
    assert rest == ["run", "--config", str(cfg.resolve())]
    assert (unit["Restart"], unit["RestartPreventExitStatus"], unit["KillSignal"]) == \
        ("on-failure", "2 5 6 7", "SIGTERM")
    assert unit["KillMode"] == "mixed"  # the hub stops its broker itself
    assert unit["WantedBy"] == "multi-user.target" and unit["User"] == "root"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (scripts/bootstrap.sh --test installs systemd)",
                    False)
    path = tmp_path / "gkt-edge.service"
    path.write_text(text)
    ok = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # ... and it does check: a unit whose program is missing fails verification.
    path.write_text(unit_for(cfg, capsys, "--executable", "/nonexistent/gkt-edge"))
    bad = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
    assert bad.returncode != 0 and "not executable" in bad.stderr


def test_hub_unit_passes_systemd_analyze_verify(tmp_path, capsys):
    cfg = tmp_path / "hub.toml"
    cfg.write_text('state-dir = "/var/lib/gkt"\nlisten = "0.0.0.0"\nrounds = 100\n')
    assert hub_cli.main(["service", "--config", str(cfg), "--user", "root"]) == 0
    text = capsys.readouterr().out
    unit = parse_unit(text)
    exe, *rest = shlex.split(unit["ExecStart"])
    assert Path(exe).name == "gkt-hub" and rest == ["serve", "--config", str(cfg.resolve())]
    # bad arguments (2) and a full disk (5) are final; no devices yet (3) or no broker (4) retry
    assert (unit["RestartPreventExitStatus"], unit["TimeoutStopSec"]) == ("2 5", "300")
    path = tmp_path / "gkt-hub.service"
    path.write_text(text)
    ok = subprocess.run([shutil.which("systemd-analyze") or "systemd-analyze", "verify",
                         str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    cfg.write_text("roundz = 3\n")
    assert hub_cli.main(["service", "--config", str(cfg)]) == 2
    assert "unknown key 'roundz'" in capsys.readouterr().err


def test_service_refuses_a_bad_config(tmp_path, capsys):
    cfg = tmp_path / "edge.toml"
    cfg.write_text('hub = "mqtt://h:1"\nthreds = 2\n')
    assert edge_cli.main(["service", "--config", str(cfg)]) == 2
    assert "unknown key 'threds'" in capsys.readouterr().err


class Supervisor:
    """systemd's Restart=on-failure for one unit: restart unless the exit was clean (0) or
    listed in RestartPreventExitStatus; a death by signal counts as a failure."""

    def __init__(self, unit: dict[str, str], log: Path) -> None:
        self.argv = shlex.split(unit["ExecStart"])
        assert unit["Restart"] == "on-failure"
        self.restart_sec = float(unit["RestartSec"])
        self.prevent = {int(x) for x in unit["RestartPreventExitStatus"].split()}
        self.log, self.exits, self.proc = log, [], None
        self.started = threading.Event()

    def run(self) -> list[int]:
        while True:
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
                self.started.set()
                rc = self.proc.wait(timeout=240)
            self.exits.append(rc)
            if rc == 0 or rc in self.prevent:
                return self.exits
            time.sleep(self.restart_sec)


@pytest.mark.mqtt
def test_killed_device_service_restarts_resumes_and_stops_on_sigterm(broker, tmp_path, capsys):
    state = tmp_path / "pi-1"
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'hub = "{broker.url}"\ndevice-id = "pi-1"\nstate-dir = "{state}"\n'
                   'num-shards = 4\nthreads = 1\nno-local-eval = true\nmax-payload = 65536\n'
                   'log-format = "json"\n')
    unit = parse_unit(unit_for(cfg, capsys, "--restart-sec", "0.5"))
    service, records = make_hub(broker, tmp_path, rounds=10, min_devices=1)
    sup = Supervisor(unit, tmp_path / "journal.log")
    progress = state / "progress.json"

    def completed() -> int:
        return json.loads(progress.read_text())["completed_round"] if progress.exists() else -1

    def wait_for_round(r: int) -> int:
        t_end = time.monotonic() + 180
        while completed() < r and time.monotonic() < t_end:
            time.sleep(0.05)
        return completed()

    def operator() -> tuple[int, int]:
        killed_at = wait_for_round(0)
        first = sup.proc
        first.send_signal(signal.SIGKILL)  # mid-run: round 0 done, round 1 under way
        stopped_at = wait_for_round(1)  # the restarted process got round 1 done
        assert sup.proc is not first
        sup.proc.send_signal(signal.SIGTERM)  # `systemctl stop`
        sup.proc.wait(60)
        service.stop()
        return killed_at, stopped_at

    results = run_threads(("hub", service.run), ("supervisor", sup.run), ("operator", operator),
                          timeout=300)
    assert results["operator"][0] == 0 and results["operator"][1] >= 1
    assert results["hub"] == 0  # a stopped hub exits 0 and does not end the federation
    assert wire.decode_message(service.announcer.last, max_bytes=1 << 20).meta["state"] != "stop"
    # SIGKILL counts as a failure: restarted once; SIGTERM exits 0: not restarted.
    assert results["supervisor"] == [-signal.SIGKILL, 0]
    assert [r.round for r in records][:2] == [0, 1]
    lines = [json.loads(x) for x in sup.log.read_text().splitlines() if x.strip()]
    msgs = [x["msg"] for x in lines if x.get("logger") == "gkt.edge"]
    assert any("resumed from" in m and "last completed round 0" in m for m in msgs)
    assert sum("round 0 complete" in m for m in msgs) == 1  # round 0 was not redone
    assert any("round 1 complete" in m for m in msgs)
    assert "pi-1: SIGTERM, stopping" in msgs[-1]
