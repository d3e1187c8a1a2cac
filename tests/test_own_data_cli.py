"""`gkt-edge run --data` as users run it: bad files through the real CLI and a real broker,
refusals with exit 2, and devices training on their own folders with a real hub. The
classes and preprocessing come with the hub's run spec (published here by the test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from own_data_files import CLASSES, write_bad, write_digits, write_odd_but_good
from polling import wait_for

from edge_runtime.device.cli import main as edge_main
from edge_runtime.learning.data import NORMALIZATION
from edge_runtime.learning.preprocess import Preprocess
from edge_runtime.protocol import topics, wire
from server_hub.broker.mosquitto import free_port
from server_hub.run.plan import build_spec
from server_hub.run.spec_store import publish_run_spec
from server_hub.simulation.inproc import FederationConfig


def announce_digits_run(make_link, url: str) -> None:
    """What `gkt-hub serve --classes 0,...,9 --image-size 8` announces (digits' normalization)."""
    spec = build_spec(FederationConfig(), tuple(CLASSES.split(",")),
                      Preprocess(8, *NORMALIZATION["digits"]), None)
    publish_run_spec(make_link(url, f"hub-{time.monotonic_ns()}"), spec)


def edge_cmd(url: str, device: str, data, state, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_runtime.device.cli", "run", "--hub", url,
            "--device-id", device, "--data", str(data), "--state-dir", str(state), *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get(
        "PYTHONPATH", "")}


def retained_hello(make_link, url: str, device: str, timeout: float = 60.0) -> dict:
    got: list[wire.Message] = []
    link = make_link(url, f"watch-{device}-{time.monotonic_ns()}")

    def on_up(_topic: str, payload: bytes) -> None:
        if payload:
            got.append(wire.decode_message(payload, max_bytes=1 << 20))

    link.subscribe(topics.up(device), on_up)
    assert wait_for(lambda: any(m.kind == "hello" for m in got), timeout), "no hello"
    return next(m for m in got if m.kind == "hello").meta


@pytest.mark.mqtt
def test_every_bad_file_is_skipped_counted_and_named_once(tmp_path, broker, make_link):
    data = tmp_path / "camera"
    good = write_digits(data, 3, classes=range(8)) + write_odd_but_good(data)
    bad = write_bad(data)
    (data / "4" / "copy_of_first.png").write_bytes(good[0].read_bytes())  # counted once
    (data / "9").mkdir()  # an empty class folder
    state = tmp_path / "state"
    announce_digits_run(make_link, broker.url)
    watcher = make_link(broker.url, "clear")
    runs = []
    for _ in range(2):  # the second start is a restart: same data, nothing decoded again
        watcher.publish(topics.up("cam"), b"", retain=True)  # forget the last hello
        proc = subprocess.Popen(edge_cmd(broker.url, "cam", data, state, "--val-fraction", "0"),
                                stderr=subprocess.PIPE, text=True, env=env())
        try:
            hello = retained_hello(make_link, broker.url, "cam")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        runs.append((hello, err))
    for hello, err in runs:
        assert hello["num_samples"] == len(good)  # nothing good lost, the copy once
        assert hello["device_metrics"]["skipped_files"] == len(bad)
        assert "Traceback" not in err
        for f in bad:
            assert err.count(f"skipped {f}:") == 1, (f.name, err[-3000:])
    n = len(good)
    assert f"{n} images ({n} newly decoded, 1 duplicate files, {len(bad)} skipped" in runs[0][1]
    assert f"{n} images (0 newly decoded" in runs[1][1]  # the cache, after restart


@pytest.mark.mqtt
def test_unusable_data_is_refused_with_exit_2(tmp_path, capsys, broker, make_link):
    announce_digits_run(make_link, broker.url)

    def run(data, *extra):
        rc = edge_main(["run", "--hub", broker.url, "--device-id", "a", "--data", str(data),
                        "--state-dir", str(tmp_path / "s"), *extra])
        return rc, capsys.readouterr().err

    write_bad(tmp_path / "only_bad")
    rc, err = run(tmp_path / "only_bad")
    assert rc == 2 and "no usable image" in err and "subfolder per class" in err
    (tmp_path / "empty").mkdir()
    assert run(tmp_path / "empty")[0] == 2
    rc, err = run(tmp_path / "nope")
    assert rc == 2 and "no such file" in err
    write_digits(tmp_path / "pets" / "cat", 1, classes=[1])  # pets/cat/1/*.png
    rc, err = run(tmp_path / "pets")
    assert rc == 2 and "labels the run does not know: ['cat']" in err
    assert "--skip-unknown-labels" in err
    rc, err = run(tmp_path / "pets", "--shard", "1", "--num-shards", "2")
    assert rc == 2 and "--shard" in err
    (tmp_path / "list.txt").write_text("a.png,1\n")
    rc, err = run(tmp_path / "list.txt")
    assert rc == 2 and "manifest" in err


@pytest.mark.mqtt
@pytest.mark.slow  # ~30 s alone, 1.5 min on a busy machine
def test_two_devices_train_on_their_own_folders_with_a_real_hub(tmp_path, broker):
    folders = [tmp_path / "dev0", tmp_path / "dev1"]
    write_digits(folders[0], 8, classes=range(0, 7))  # overlapping subsets of the classes
    write_digits(folders[1], 8, classes=range(4, 10), start=8)
    (folders[1] / "6" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    status_port = free_port()
    hub = subprocess.Popen(
        [sys.executable, "-m", "server_hub.cli.main", "serve", "--broker", broker.url,
         "--state-dir", str(tmp_path / "hub"), "--min-devices", "2", "--rounds", "2",
         "--server-epochs", "1", "--batch-size", "16", "--dataset", "digits",
         "--no-progress", "--status-port", str(status_port), "--monitor-linger", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    devices = [subprocess.Popen(edge_cmd(broker.url, f"d{i}", f, tmp_path / f"s{i}"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env()) for i, f in enumerate(folders)]
    try:
        errs = [d.communicate(timeout=240)[1] for d in devices]
        assert [d.returncode for d in devices] == [0, 0], errs[1][-2000:]
        status = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{status_port}/status.json", timeout=10).read())
    finally:
        hub.send_signal(signal.SIGTERM)
        out, err = hub.communicate(timeout=60)
        for d in devices:
            d.kill() if d.poll() is None else None
    assert hub.returncode == 0, err[-2000:]
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1]
    by_id = {d["id"]: d for d in status["devices"]}
    assert by_id["d1"]["skipped_files"] == 1 and by_id["d0"]["skipped_files"] == 0
    assert 0 <= by_id["d0"]["edge_accuracy"] <= 1  # accuracy on its held-out images
    assert "round 1 complete" in errs[0] and "skipped" in errs[1] and "broken.jpg" in errs[1]


def test_the_skipped_count_is_a_device_metric_the_hub_keeps():
    from edge_runtime.protocol.device_metrics import device_metrics
    from server_hub.monitoring.metrics import DEVICE_GAUGES
    from server_hub.monitoring.snapshot import clean_report

    sent = device_metrics(10, skipped_files=3)
    assert clean_report({"device_metrics": sent})["skipped_files"] == 3
    assert "skipped_files" not in device_metrics(10)  # academic datasets: not reported
    assert DEVICE_GAUGES["skipped_files"][0] == "gkt_device_skipped_files"
