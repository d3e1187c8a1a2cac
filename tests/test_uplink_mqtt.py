"""Feature refresh over a real Mosquitto: after warm-up a round uploads only ids, labels and
logits; a hub restart (one device's held maps lost with it) and a device restart keep both
sides' idea of the hub's copy equal, resyncing only the device whose copy was lost."""

from __future__ import annotations

import shutil
import threading

import pytest
from test_mqtt_federation import make_agent, prepare_test

from edge_runtime.learning.data import DataConfig, make_loader
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from server_hub.hub import Hub
from server_hub.service import HubService, ServiceConfig
from server_hub.simulation.inproc import FederationConfig, prepare
from server_hub.trainer import ServerTrainConfig

pytestmark = pytest.mark.mqtt
DATA = DataConfig("digits")


@pytest.fixture(scope="module")
def setup():
    return prepare(FederationConfig(data=DATA, devices=2))


def hub_service(broker, state, name, rounds, stop_after=None):
    link = MqttLink(LinkConfig(broker.url, name))
    link.connect()
    hub = Hub(10, ServerTrainConfig(epochs=1, batch_size=32, device="cpu"),
              feature_dir=state / "features", held_dir=state / "held")
    records = []
    cfg = ServiceConfig(str(state), rounds=rounds, min_devices=2, round_deadline=120,
                        start_timeout=120)
    svc = HubService(link, hub, cfg, DATA, make_loader(prepare_test(), 256, shuffle=False),
                     records.append)

    def on_round(rec):
        records.append(rec)
        if stop_after is not None and rec.round == stop_after:
            svc.stop()
    svc.on_round = on_round
    return svc, records


def epochs_agree(svc, agents):
    return all(a.device.mirror.epoch is not None and
               a.device.mirror.epoch == svc.hub.held.epoch(a.device.device_id) for a in agents)


@pytest.mark.slow  # 4 rounds, two hubs, a device restart: minutes on 2 shared cores
def test_refresh_survives_hub_and_device_restarts(broker, tmp_path, setup):
    state = tmp_path / "hub"
    svc, records = hub_service(broker, state, "hub1", rounds=4, stop_after=1)
    agents = [make_agent(broker, tmp_path, setup, i, refresh="freeze:1") for i in range(2)]
    threads = {a.device.device_id: threading.Thread(target=a.run) for a in agents}
    for t in threads.values():
        t.start()
    assert svc.run() == 0
    assert [r.round for r in records] == [0, 1]
    assert records[1].upload_bytes < records[0].upload_bytes / 10  # no maps after warm-up
    assert epochs_agree(svc, agents)
    svc.link.close()

    # dev1 restarts from its state dir; the hub restarts having lost dev0's held maps.
    agents[1].stop()
    threads["dev1"].join(60)
    agents[1].link.close()
    for f in (state / "held").glob("dev0.*"):
        f.unlink()
    agents[1] = make_agent(broker, tmp_path, setup, 1, refresh="freeze:1")
    assert agents[1].device.load(tmp_path / "dev1")
    threads["dev1"] = threading.Thread(target=agents[1].run)
    threads["dev1"].start()
    svc2, records2 = hub_service(broker, state, "hub2", rounds=4)
    assert svc2.hub.held.epoch("dev0") is None and svc2.hub.held.epoch("dev1") is not None
    assert svc2.run() == 0
    for t in threads.values():
        t.join(120)
    assert [r.round for r in records2] == [2, 3]
    assert svc2.intake.rejected["resync"] >= 1  # dev0's first chunk named maps the hub lost
    assert epochs_agree(svc2, agents)
    assert records2[1].upload_bytes < records[0].upload_bytes / 10  # settled again
    assert records2[-1].test_accuracy > 0.4
    shutil.rmtree(state / "features", ignore_errors=True)
