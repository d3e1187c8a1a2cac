"""Metrics, status page and `gkt-hub status` of a real federation over a real Mosquitto.

One module-scoped federation (hub service + 2 edge agents, 4 rounds): Prometheus metrics
are scraped over HTTP before the first round and after every round and parsed with
prometheus_client's own text parser; the finished state is then served as JSON, printed by
`gkt-hub status`, and rendered by a real headless Chromium.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import start_broker
from PIL import Image
from probes import scrape
from test_mqtt_federation import make_agent, make_hub, prepare_test, run_threads

from edge_runtime.learning.data import DataConfig, make_loader
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics
from server_hub.assembly.options import MonitorOptions
from server_hub.cli import main as hub_cli
from server_hub.monitoring.endpoints import start_monitoring
from server_hub.simulation.inproc import FederationConfig, prepare

pytestmark = pytest.mark.mqtt
ROUNDS = 3


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    bdir = Path(tempfile.mkdtemp(prefix="gkt-test-broker-"))
    bdir.chmod(0o755)  # the broker's own user must enter it
    broker = start_broker(bdir / "state")
    # 2 devices with a quarter of digits each: the hub's CPU training stays short
    setup = prepare(FederationConfig(data=DataConfig("digits"), devices=4))
    service, records = make_hub(broker, tmp, rounds=ROUNDS, min_devices=2)
    scrapes = []

    def on_round(rec):  # on the hub's main thread, between rounds: a scrape mid-run
        records.append(rec)
        scrapes.append(scrape(metrics.port))

    service.on_round = on_round  # as serve passes it; monitoring chains its own before it
    mon = start_monitoring(MonitorOptions(metrics_port=0, status_port=0), service)
    metrics, status = mon.servers
    hub = threading.Thread(target=service.run)
    hub.start()
    assert service.intake.listening.wait(60)
    attacker = MqttLink(LinkConfig(broker.url, f"attacker-{tmp.name}"))
    attacker.connect()
    attacker.publish(topics.up("mallory"), b"\x80\x04pickle-bytes")
    attacker.close()
    before = scrape(metrics.port)
    agents = [make_agent(broker, tmp, setup, i) for i in range(2)]
    for a in agents:  # so they report their own classifier's accuracy too
        a.test_loader = make_loader(prepare_test(), 256, shuffle=False)
    results = run_threads(*[(f"a{i}", a.run) for i, a in enumerate(agents)], timeout=300)
    hub.join(60)
    assert results == {"a0": 0, "a1": 0} and not hub.is_alive()
    yield argparse.Namespace(service=service, records=records, scrapes=scrapes, before=before,
                             agents=agents, status=status, metrics=metrics, tmp=tmp)
    mon.close()
    broker.stop()
    shutil.rmtree(bdir, ignore_errors=True)


def test_metrics_change_as_rounds_progress(fed):
    assert len(fed.scrapes) == ROUNDS
    b = fed.before
    assert b[("gkt_hub_rounds_completed_total", ())] == 0
    assert b[("gkt_hub_round_duration_seconds_count", ())] == 0
    assert b[("gkt_hub_rejected_messages_total", (("reason", "bad_magic"),))] == 1
    n_samples = sum(a.device.num_samples for a in fed.agents)
    received = [b[("gkt_hub_received_bytes_total", ())]]
    for k, (m, rec) in enumerate(zip(fed.scrapes, fed.records)):
        assert m[("gkt_hub_round", ())] == k
        assert m[("gkt_hub_rounds_completed_total", ())] == k + 1
        assert m[("gkt_hub_round_duration_seconds_count", ())] == k + 1
        assert m[("gkt_hub_samples_received_total", ())] == (k + 1) * n_samples
        assert m[("gkt_hub_test_accuracy", ())] == pytest.approx(rec.test_accuracy)
        assert m[("gkt_hub_devices_known", ())] == 2
        assert m[("gkt_hub_devices_active", ())] == 2
        assert m[("gkt_hub_rejected_messages_total", (("reason", "bad_magic"),))] == 1
        received.append(m[("gkt_hub_received_bytes_total", ())])
        assert m[("gkt_hub_sent_bytes_total", ())] > 0
        done = fed.records[:k + 1]  # uplink/downlink per round and cumulative, as recorded
        assert m[("gkt_hub_round_uplink_bytes", ())] == rec.upload_bytes > 0
        assert m[("gkt_hub_round_downlink_bytes", ())] == rec.download_bytes > 0
        assert m[("gkt_hub_uplink_bytes_total", ())] == sum(r.upload_bytes for r in done)
        assert m[("gkt_hub_downlink_bytes_total", ())] == sum(r.download_bytes for r in done)
        for a in fed.agents:  # what each device reported about itself, labelled by device
            d = (("device", a.device.device_id),)
            assert m[("gkt_device_samples", d)] == a.device.num_samples
            assert 0 < m[("gkt_device_train_seconds", d)] < 60
            assert m[("gkt_device_max_rss_bytes", d)] > 50e6  # torch alone is more
            assert 0 <= m[("gkt_device_edge_accuracy", d)] <= 1
            assert m[("gkt_device_sent_bytes_total", d)] > 0
    assert all(x < y for x, y in zip(received, received[1:]))  # bytes grow every round
    total = fed.scrapes[-1][("gkt_hub_round_duration_seconds_sum", ())]
    assert total == pytest.approx(sum(r.seconds for r in fed.records), rel=1e-6)


def test_status_json_and_the_status_command(fed, capsys):
    snap = json.loads(get(fed.status.url + "status.json"))
    assert [d["id"] for d in snap["devices"]] == ["dev0", "dev1"]
    assert {d["state"] for d in snap["devices"]} == {"finished"}
    assert [r["round"] for r in snap["history"]] == list(range(ROUNDS))
    assert snap["rejected"] == {"bad_magic": 1} and snap["rounds_completed"] == ROUNDS
    assert snap["bytes_received"] == fed.service.link.bytes_received
    with pytest.raises(urllib.error.HTTPError):
        get(fed.status.url + "nothing-here")
    assert hub_cli.main(["status", "--url", fed.status.url]) == 0
    out = capsys.readouterr().out
    assert f"round {ROUNDS - 1}/{ROUNDS} (done), {ROUNDS} completed" in out
    assert "dev0" in out and "dev1" in out and "bad_magic 1" in out
    acc = f"{fed.records[-1].test_accuracy:.4f}"
    assert acc in out
    assert hub_cli.main(["status", "--url", "http://127.0.0.1:9/"]) == 4
    assert "cannot read" in capsys.readouterr().err


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed (scripts/bootstrap.sh --test installs it)", False)
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp}", *args], capture_output=True, text=True, timeout=120)


def test_status_page_in_headless_chromium(fed, tmp_path):
    png = tmp_path / "status-page.png"
    shot = chromium(f"--screenshot={png}", "--window-size=1200,900", fed.status.url,
                    tmp=tmp_path / "profile1")
    assert shot.returncode == 0, shot.stderr[-2000:]
    img = Image.open(png)
    assert img.size == (1200, 900)
    colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 100  # text, tables and a plot, not a blank or error page
    dom = chromium("--dump-dom", fed.status.url, tmp=tmp_path / "profile2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "dev0" in html and "dev1" in html and "bad_magic" in html
    assert "<svg" in html and html.count("<polyline") == 2  # test and device accuracy
