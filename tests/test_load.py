"""Load: 32 light devices upload one round at once through a real Mosquitto; the hub,
spilling features to its state directory, gets every sample exactly once."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from edge_runtime.learning.data import DataConfig
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from server_hub.hub import Hub
from server_hub.service import HubService, ServiceConfig
from server_hub.trainer import ServerTrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from load_senders import LoadConfig, run_senders  # noqa: E402

pytestmark = pytest.mark.mqtt


def test_32_devices_upload_at_once_every_sample_exactly_once(broker, broker_dir):
    torch.set_num_threads(1)
    cfg = LoadConfig(devices=32, samples=16, size=8, max_payload=16 * 1024)
    state = broker_dir / "hub"
    hub = Hub(10, ServerTrainConfig(epochs=1, batch_size=64, device="cpu"),
              feature_dir=state / "features")
    images = TensorDataset(torch.randn(4, 3, cfg.size, cfg.size), torch.randint(0, 10, (4,)))
    link = MqttLink(LinkConfig(broker.url, "hub-load", max_packet_size=cfg.max_payload + 4096))
    link.connect()
    records = []
    svc = HubService(link, hub, ServiceConfig(str(state), rounds=1, min_devices=cfg.devices,
                                              round_deadline=120, start_timeout=120,
                                              max_payload=cfg.max_payload + 4096),
                     DataConfig("digits"), DataLoader(images, batch_size=4), records.append)
    code = {}
    hub_thread = threading.Thread(target=lambda: code.setdefault("hub", svc.run()))
    hub_thread.start()
    try:
        results = run_senders(broker.url, cfg, timeout=180)
    finally:
        svc.stop()
        hub_thread.join(120)
        link.close()
    assert code == {"hub": 0} and len(records) == 1
    assert [r.error for r in results] == [None] * cfg.devices
    for r in results:
        got = hub.bank.get(r.device)
        assert got.ids.tolist() == r.sent_ids  # every sample once, no duplicate
        assert got.features.shape == (cfg.samples, 16, cfg.size, cfg.size)
        assert set(r.logits_per_id) == set(r.sent_ids)  # and its logits came back
        assert set(r.logits_per_id.values()) == {1}  # exactly once
    assert hub.bank.num_samples() == cfg.devices * cfg.samples
    assert hub.bank.resident_feature_bytes() == 0  # the features live in the spill files
    files = sorted((state / "features").glob("*.features"))
    assert len(files) == cfg.devices
    assert {f.stat().st_size for f in files} == {cfg.samples * 16 * cfg.size ** 2 * 4}
    assert sum(r.bytes_up for r in results) == records[0].upload_bytes
    assert svc.intake.rejected == {}
