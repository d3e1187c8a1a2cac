"""One process per state dir, and a device's state dir stays that device's: two devices
given one --state-dir used to overwrite each other's saves until one died with a traceback
(`FileNotFoundError: optimizer.pt.tmp`). Now the second is refused at start with exit 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from edge_runtime.device.cli import main as edge_main
from edge_runtime.ops.state_lock import (
    StateDirError,
    claim_for_device,
    lock_state_dir,
)
from server_hub.cli.main import main as hub_main
from tests.polling import wait_for


def test_a_second_lock_is_refused_until_the_first_is_released(tmp_path):
    first = lock_state_dir(tmp_path / "s", "gkt-edge run")
    with pytest.raises(StateDirError, match=r"in use by another gkt-edge run \(pid \d+\)"):
        lock_state_dir(tmp_path / "s", "gkt-edge run")
    first.close()
    lock_state_dir(tmp_path / "s", "gkt-edge run").close()


def test_a_dir_claimed_by_one_device_is_refused_to_another(tmp_path):
    claim_for_device(tmp_path, "pi-0")
    claim_for_device(tmp_path, "pi-0")  # the same device again: fine
    with pytest.raises(StateDirError, match="holds device pi-0's state, not pi-1's"):
        claim_for_device(tmp_path, "pi-1")
    (tmp_path / "device.json").write_text("{not json")
    with pytest.raises(StateDirError, match="cannot be read"):
        claim_for_device(tmp_path, "pi-0")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # may land before its handler is set: not the point here
    proc.communicate(timeout=60)


@pytest.mark.mqtt
def test_a_second_device_on_a_running_devices_state_dir_exits_2(broker, tmp_path, capsys):
    state = tmp_path / "dev"
    first = subprocess.Popen(  # waits for a run spec (none comes), holding the dir
        [sys.executable, "-m", "edge_runtime.device.cli", "run", "--hub", broker.url,
         "--device-id", "pi-0", "--state-dir", str(state), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: (state / "device.json").exists(), 60)
        rc = edge_main(["run", "--hub", broker.url, "--device-id", "pi-0",
                        "--state-dir", str(state)])
        assert rc == 2
        err = capsys.readouterr().err
        assert f"in use by another gkt-edge run (pid {first.pid})" in err
        assert "its own --state-dir" in err
    finally:
        if first.poll() is None:
            _stop(first)
    assert json.loads((state / "device.json").read_text()) == {"device_id": "pi-0"}
    # the first has stopped: the dir is free, but it is still pi-0's
    rc = edge_main(["run", "--hub", broker.url, "--device-id", "pi-1",
                    "--state-dir", str(state)])
    assert rc == 2
    assert "holds device pi-0's state, not pi-1's" in capsys.readouterr().err


@pytest.mark.mqtt
def test_a_second_hub_on_a_serving_hubs_state_dir_exits_2(broker, tmp_path, capsys):
    state = tmp_path / "hub"
    args = ["serve", "--broker", broker.url, "--state-dir", str(state), "--dataset",
            "digits", "--rounds", "1", "--min-devices", "1", "--device", "cpu",
            "--start-timeout", "120", "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "server_hub.cli.main", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: (state / "run_spec.json").exists(), 60)
        assert hub_main(args) == 2
        err = capsys.readouterr().err
        assert f"in use by another gkt-hub serve (pid {first.pid})" in err
    finally:
        if first.poll() is None:
            _stop(first)
