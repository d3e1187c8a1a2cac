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
from edge_runtime.ops.state_dir import (
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


def _spec(seed_run: str):
    from dataclasses import replace

    from edge_runtime.learning.data import DataConfig
    from server_hub.run.plan import dataset_plan
    from server_hub.simulation.inproc import FederationConfig

    return replace(dataset_plan(FederationConfig(data=DataConfig("digits"))).spec,
                   run_id=seed_run)


def test_new_run_keeps_the_old_runs_files_and_the_decode_cache(tmp_path):
    from edge_runtime.device.adopt import RunSpecMismatch, adopt_state_dir

    a, b = _spec("run-a"), _spec("run-b")
    adopt_state_dir(tmp_path, a)
    claim_for_device(tmp_path, "pi-0")
    for name in ("model.pt", "progress.json", "own-data.sqlite", "own-data.sqlite-wal"):
        (tmp_path / name).write_text(name)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "composed-r0009.onnx").write_text("onnx")
    with pytest.raises(RunSpecMismatch, match="start again with --new-run"):
        adopt_state_dir(tmp_path, b)
    adopt_state_dir(tmp_path, b, new_run=True)
    old = tmp_path / "runs" / "run-a"
    assert sorted(p.name for p in old.iterdir()) == [
        "model", "model.pt", "progress.json", "run_spec.json"]
    assert (old / "model" / "composed-r0009.onnx").read_text() == "onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "device.json", "own-data.sqlite", "own-data.sqlite-wal", "run_spec.json", "runs"]
    assert json.loads((tmp_path / "run_spec.json").read_text())["run_id"] == "run-b"
    adopt_state_dir(tmp_path, b, new_run=True)  # the same run again: nothing moves
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-a"]


@pytest.mark.mqtt
def test_a_device_follows_the_hub_to_a_new_run_with_new_run(broker, make_link, tmp_path,
                                                             capsys):
    """The hub starts another run while a device waits in the old one: without --new-run
    the device stops with exit 2 (its state is the old run's); with it, exit 3, which the
    service restarts, and the restart moves the old run aside and joins the new one."""
    import threading
    import time

    from edge_runtime.protocol import topics, wire
    from server_hub.run.spec_store import publish_run_spec

    hub = make_link(broker.url, "hub")
    state = tmp_path / "dev"
    argv = ["run", "--hub", broker.url, "--device-id", "pi-0", "--dataset", "digits",
            "--num-shards", "8", "--state-dir", str(state), "--threads", "1",
            "--no-local-eval"]

    def switch_to(run_id: str) -> threading.Thread:
        def later() -> None:  # once the device holds the current run, the hub moves on
            wait_for(lambda: (state / "progress.json").exists() or
                     (state / "run_spec.json").exists(), 60)
            time.sleep(1.0)
            publish_run_spec(hub, _spec(run_id))
        t = threading.Thread(target=later)
        t.start()
        return t

    publish_run_spec(hub, _spec("run-a"))
    t = switch_to("run-b")
    assert edge_main(argv) == 2
    t.join()
    assert "Start it again with --new-run" in capsys.readouterr().err
    publish_run_spec(hub, _spec("run-a"))  # the state dir is still run-a's: it resumes
    t = switch_to("run-c")
    assert edge_main([*argv, "--new-run"]) == 3
    t.join()
    stop = wire.encode_message("round", "hub", 0, {}, msg_id="round-0-stop", meta={
        "state": "stop", "deadline": None, "epoch": "e", "run": "run-c", "hub": "h",
        "issued": time.time()})
    hub.publish(topics.ROUND_TOPIC, stop, retain=True)
    assert edge_main([*argv, "--new-run"]) == 0  # the restart: moves run-a aside, joins
    assert json.loads((state / "run_spec.json").read_text())["run_id"] == "run-c"
    assert (state / "runs" / "run-a" / "run_spec.json").is_file()


def test_serve_new_run_moves_the_last_run_and_keeps_enrolment_and_broker(tmp_path):
    from server_hub.cli.serve import start_new_run

    (tmp_path / "run_spec.json").write_text(json.dumps({"run_id": "run-x"}))
    for d in ("checkpoints/round-0009", "features", "held", "models", "uploads",
              "security", "broker/data"):
        (tmp_path / d).mkdir(parents=True)
    for f in ("registry.json", "run.json", "round.key", "security/passwd", "security/ca.pem",
              "broker/mosquitto.conf"):
        (tmp_path / f).write_text(f)
    start_new_run(tmp_path)
    assert sorted(p.name for p in (tmp_path / "runs" / "run-x").iterdir()) == [
        "checkpoints", "features", "held", "models", "registry.json", "run.json",
        "run_spec.json", "uploads"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broker", "round.key", "runs", "security"]
    assert (tmp_path / "security" / "passwd").read_text() == "security/passwd"
    start_new_run(tmp_path)  # nothing left to move: a no-op
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-x"]
