"""The console scripts as users run them."""

import json
import subprocess
import sys

import pytest

from edge_runtime.device.cli import main as edge_main
from server_hub.broker.mosquitto import free_port
from server_hub.cli.main import main as hub_main


def test_edge_rejects_bad_arguments_with_exit_code_2(capsys):
    assert edge_main(["run", "--hub", "mqtt://127.0.0.1:1", "--device-id", "a/b"]) == 2
    assert "device id" in capsys.readouterr().err
    assert edge_main(["run", "--hub", "mqtt://127.0.0.1:1", "--device-id", "a",
                      "--shard", "3", "--num-shards", "2"]) == 2
    assert edge_main(["run", "--hub", "mqtt://127.0.0.1:1", "--device-id", "a",
                      "--codec", "q3"]) == 2
    assert "unknown codec" in capsys.readouterr().err


def test_max_payload_below_the_minimum_is_refused_by_name(capsys):
    for main, argv in ((edge_main, ["run", "--hub", "mqtt://127.0.0.1:1", "--device-id", "a"]),
                       (hub_main, ["serve"])):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--max-payload", "1000"])
        assert exc.value.code == 2
        assert "--max-payload: 1000 bytes is below the minimum of 16384" in capsys.readouterr().err


def test_edge_says_when_the_broker_is_unreachable(capsys, tmp_path):
    rc = edge_main(["run", "--hub", f"mqtt://127.0.0.1:{free_port()}", "--device-id", "a",
                    "--state-dir", str(tmp_path)])
    assert rc == 4
    assert "cannot reach MQTT broker" in capsys.readouterr().err


@pytest.mark.mqtt
def test_edge_refuses_a_state_dir_saved_for_another_device(capsys, tmp_path, broker,
                                                           make_link):
    from edge_runtime.device.adopt import adopt_state_dir
    from edge_runtime.device.edge_device import EdgeDevice
    from edge_runtime.learning.data import DataConfig
    from edge_runtime.learning.train import EdgeTrainConfig
    from server_hub.run.plan import dataset_plan
    from server_hub.run.spec_store import publish_run_spec
    from server_hub.simulation.inproc import FederationConfig, prepare

    cfg = FederationConfig(data=DataConfig("digits"), devices=4)
    spec = dataset_plan(cfg).spec
    publish_run_spec(make_link(broker.url, "hub"), spec)  # the run the device adopts
    setup = prepare(cfg)
    adopt_state_dir(tmp_path, spec)  # the same run, but a damaged model: a 100-class head
    EdgeDevice("a", setup.train, setup.train_eval, setup.shards[0], 100,
               EdgeTrainConfig()).save(tmp_path)
    rc = edge_main(["run", "--hub", broker.url, "--device-id", "a", "--dataset", "digits",
                    "--state-dir", str(tmp_path)])
    assert rc == 2  # a restart would fail the same way: systemd must not loop on it
    err = capsys.readouterr().err
    assert "does not fit this device" in err and "--state-dir" in err


@pytest.mark.mqtt
def test_simulate_over_mqtt_with_device_processes(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "server_hub.cli.main", "simulate", "--devices", "2", "--rounds", "2",
         "--server-epochs", "1", "--codec", "q4", "--state-dir", str(tmp_path / "state"),
         "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["transport"] == "mqtt" and data["codec"] == "q4"
    assert [r["round"] for r in data["rounds"]] == [0, 1]
    assert data["final"]["test_accuracy"] > 0.3
    crossed = data["broker_bytes"]
    assert crossed["device_exit_codes"] == [0, 0]
    assert crossed["hub_received"] >= data["final"]["upload_bytes"]
    assert crossed["broker"]["publish/bytes/received"] >= crossed["hub_received"]
    assert (tmp_path / "state" / "checkpoints" / "LATEST").exists()
    assert (tmp_path / "state" / "devices" / "dev1" / "edge.safetensors").exists()
    assert "round" in proc.stdout and "final test accuracy" in proc.stdout
    sent = data["delivery"]  # at the end every device got its composed model
    assert sent["round"] == 1 and sent["acked"] == ["dev0", "dev1"] and not sent["missing"]
    assert sent["seconds_to_all_acked"] > 0 and min(sent["bytes_on_wire"].values()) > 1e5
    assert "gkt-edge predict --state-dir" in proc.stdout
    dev_log = (tmp_path / "state" / "logs" / "dev0.log").read_text()  # the device says it too
    dev_state = tmp_path / "state" / "devices" / "dev0"
    assert f"classify images with: gkt-edge predict --state-dir {dev_state}" in dev_log


def test_serve_ends_with_a_line_that_says_where_the_run_ended():
    import dataclasses
    from pathlib import Path

    from server_hub.assembly.hub_run import HubOutcome
    from server_hub.cli.serve import finished_line
    from server_hub.hub_status import HubStatus
    from server_hub.monitoring.results import RoundRecord

    status = HubStatus("sync", 9, 10, "done", 60.0, {}, {}, {}, 0, 0, run_id="run-abc",
                       class_report={"classes": ["cat", "dog"],
                                     "per_class_accuracy": [0.9, 0.625], "confusion": []},
                       delivery={"round": 9, "acked": ["a", "b"], "missing": ["c"]})
    line = finished_line(HubOutcome(0, status, RoundRecord(9, 0.7625, 0, 0, 1.0)),
                         Path("hub"))
    assert line == ("run run-abc finished at round 9: test accuracy 0.7625 (weakest class "
                    "dog: 0.6250); every round in hub/run.json; 2/3 devices hold their "
                    "round 9 model")
    # stopped by SIGTERM mid-run: a restart resumes, nothing finished
    stopped = dataclasses.replace(status, phase="train")
    assert finished_line(HubOutcome(0, stopped, RoundRecord(9, 0.7625, 0, 0, 1.0)),
                         Path("hub")) is None
