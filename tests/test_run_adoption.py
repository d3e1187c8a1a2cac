"""The hub owns the run: `gkt-hub serve` announces its run spec, a `gkt-edge` process
adopts it over a real Mosquitto, and state saved under another run is refused (exit 2)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from dataclasses import replace

import pytest

from edge_runtime.device.adopt import RunSpecMismatch, adopt_state_dir
from edge_runtime.device.cli import main as edge_main
from edge_runtime.learning.data import DataConfig
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.run_spec import decode_run_spec
from server_hub.admission import check_run_id
from server_hub.run.plan import dataset_plan
from server_hub.run.spec_store import RunSpecConflict, publish_run_spec, settle_run_spec
from server_hub.simulation.inproc import FederationConfig

DIGITS = FederationConfig(data=DataConfig("digits"))


def retained(link, topic: str, timeout: float = 60.0) -> bytes:
    got: list[bytes] = []
    seen = threading.Event()

    def on(_t, payload):
        if payload:
            got.append(payload)
            seen.set()

    link.subscribe(topic, on)
    assert seen.wait(timeout), f"nothing retained on {topic}"
    return got[-1]


def test_hub_state_dir_keeps_the_run_id_and_refuses_another_run(tmp_path):
    first = settle_run_spec(tmp_path, dataset_plan(DIGITS).spec)
    again = settle_run_spec(tmp_path, dataset_plan(DIGITS).spec)  # a restart: fresh id drawn
    assert again.run_id == first.run_id and again == first
    faster = settle_run_spec(tmp_path, replace(dataset_plan(DIGITS).spec, lr=0.01))
    assert faster.run_id == first.run_id and faster.lr == 0.01  # settings may change
    other = replace(dataset_plan(DIGITS).spec, classes=tuple("abcdefghij"))
    with pytest.raises(RunSpecConflict, match=f"holds run {first.run_id}.*classes"):
        settle_run_spec(tmp_path, other)
    assert decode_run_spec((tmp_path / "run_spec.json").read_bytes()) == faster


def test_device_state_of_another_run_is_refused(tmp_path):
    spec = dataset_plan(DIGITS).spec
    adopt_state_dir(tmp_path, spec)
    adopt_state_dir(tmp_path, replace(spec, epochs=3))  # the same run, other settings
    with pytest.raises(RunSpecMismatch, match="saved under run .*start again with --new-run"):
        adopt_state_dir(tmp_path, dataset_plan(DIGITS).spec)  # another run id
    (tmp_path / "run_spec.json").unlink()
    (tmp_path / "progress.json").write_text("{}")
    with pytest.raises(RunSpecMismatch, match="before this device knew run specs"):
        adopt_state_dir(tmp_path, spec)


def test_hub_refuses_a_hello_of_another_run():
    spec = dataset_plan(DIGITS).spec
    check_run_id(spec, "d", {"run_id": spec.run_id})
    with pytest.raises(wire.WireError) as err:
        check_run_id(spec, "d", {"run_id": "run-other"})
    assert err.value.reason == "wrong_run" and spec.run_id in str(err.value)


def test_the_hubs_feature_size_is_the_run_specs_not_the_default_datasets(tmp_path):
    """`simulate --device-data` without --image-size: the run is 32x32 while the (unused)
    default dataset, digits, is 8x8; the hub must expect the run's size."""
    from edge_runtime.learning.preprocess import Preprocess
    from server_hub.hub import Hub
    from server_hub.run.plan import build_spec
    from server_hub.service import ServiceConfig, make_intake
    from server_hub.trainer import ServerTrainConfig

    spec = build_spec(DIGITS, tuple("abc"), Preprocess(32), None)
    cfg = ServiceConfig(str(tmp_path), run_spec=spec)
    intake = make_intake(None, Hub(3, ServerTrainConfig(device="cpu")), cfg, DIGITS.data)
    assert DIGITS.data.size == 8 and intake.feature_size() == 32


@pytest.mark.mqtt
def test_edge_with_state_of_another_run_exits_2_and_says_what_to_do(broker, make_link,
                                                                    tmp_path, capsys):
    old, new = dataset_plan(DIGITS).spec, dataset_plan(DIGITS).spec
    adopt_state_dir(tmp_path / "dev", old)
    publish_run_spec(make_link(broker.url, "hub"), new)
    rc = edge_main(["run", "--hub", broker.url, "--device-id", "a", "--dataset", "digits",
                    "--state-dir", str(tmp_path / "dev"), "--threads", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"saved under run {old.run_id}" in err and new.run_id in err
    assert "--state-dir" in err and "start again with --new-run" in err


@pytest.mark.mqtt
def test_edge_refuses_a_dataset_other_than_the_runs(broker, make_link, tmp_path, capsys):
    publish_run_spec(make_link(broker.url, "hub"), dataset_plan(DIGITS).spec)
    rc = edge_main(["run", "--hub", broker.url, "--device-id", "a", "--dataset", "cifar10",
                    "--state-dir", str(tmp_path), "--threads", "1"])
    assert rc == 2
    assert "uses digits" in capsys.readouterr().err


@pytest.mark.mqtt
def test_serve_announces_the_run_and_a_device_process_adopts_it(broker, make_link, tmp_path):
    hub_state, dev_state = tmp_path / "hub", tmp_path / "dev"
    hub = subprocess.Popen(
        [sys.executable, "-m", "server_hub.cli.main", "serve", "--broker", broker.url,
         "--state-dir", str(hub_state), "--dataset", "digits", "--rounds", "1",
         "--min-devices", "1", "--server-epochs", "1", "--batch-size", "16",
         "--temperature", "2.5", "--codec", "q4", "--codecs", "q4,q8", "--device", "cpu",
         "--refresh", "freeze:2", "--logits-codec", "s8",
         "--start-timeout", "120", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dev = None
    try:
        probe = make_link(broker.url, "probe")
        spec = decode_run_spec(retained(probe, topics.RUN_TOPIC))
        assert (spec.batch_size, spec.temperature, spec.codec) == (16, 2.5, "q4")
        assert (spec.refresh, spec.logits_codec) == ("freeze:2", "s8")
        assert spec.classes == tuple(str(i) for i in range(10)) and spec.dataset == "digits"
        saved = json.loads((hub_state / "run_spec.json").read_text())
        assert saved["run_id"] == spec.run_id
        dev = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.device.cli", "run", "--hub", broker.url,
             "--device-id", "d0", "--state-dir", str(dev_state), "--num-shards", "8",
             "--threads", "1", "--no-local-eval"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        hello = wire.decode_message(retained(probe, topics.up("d0"), 120), max_bytes=1 << 20)
        assert hello.meta["run_id"] == spec.run_id and hello.meta["codec"] == "q4"
        for p in (dev, hub):  # a whole round is test_mqtt_federation's job
            p.send_signal(signal.SIGTERM)
        out = dev.communicate(timeout=60)[0]
        assert dev.returncode == 0, out[-3000:]
        assert "refresh freeze:2, logits s8" in out  # what the device adopted
        assert hub.wait(60) == 0, hub.stdout.read()[-3000:]
    finally:
        for p in (hub, dev):
            if p is not None and p.poll() is None:
                p.kill()
    assert f"adopted run {spec.run_id}" in out
    assert decode_run_spec((dev_state / "run_spec.json").read_bytes()) == spec


@pytest.mark.mqtt
@pytest.mark.slow  # a hub and a device process through a whole round: ~60 s on a busy machine
def test_serve_evaluates_on_test_data_and_writes_per_class_results(broker, tmp_path):
    from own_data_files import write_digits

    write_digits(tmp_path / "cam", 6)
    write_digits(tmp_path / "held-out", 3, start=6)
    hub = subprocess.Popen(
        [sys.executable, "-m", "server_hub.cli.main", "serve", "--broker", broker.url,
         "--state-dir", str(tmp_path / "hub"), "--test-data", str(tmp_path / "held-out"),
         "--image-size", "8", "--rounds", "1", "--min-devices", "1", "--server-epochs", "1",
         "--device", "cpu", "--start-timeout", "120", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dev = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.device.cli", "run", "--hub", broker.url,
         "--device-id", "cam", "--data", str(tmp_path / "cam"), "--state-dir",
         str(tmp_path / "dev"), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = hub.communicate(timeout=300)[0]
        assert hub.returncode == 0, out[-3000:]
        assert dev.wait(60) == 0, dev.stdout.read()[-3000:]
    finally:
        for p in (hub, dev):
            if p.poll() is None:
                p.kill()
    run = json.loads((tmp_path / "hub" / "run.json").read_text())
    acc = run["rounds"][0]["test_accuracy"]
    assert (f"finished at round 0: test accuracy {acc:.4f} (weakest class " in out
            and "1/1 devices hold their round 0 model" in out), out[-3000:]
    spec = run["run_spec"]
    assert spec["classes"] == [str(d) for d in range(10)] and spec["preprocess"]["size"] == 8
    assert spec["preprocess"]["mean"] != [0.5, 0.5, 0.5]  # measured on the held-out images
    rep = run["class_report"]
    assert [sum(row) for row in rep["confusion"]] == [3] * 10  # one device, 3 a class
    assert run["rounds"][0]["per_class_accuracy"] == rep["per_class_accuracy"]
