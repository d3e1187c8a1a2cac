"""The async hub service's message path with a fake link (the real broker is in
test_async_mqtt.py): validation and acks inherited from the sync service, merge on a
complete upload, stale resends, and the journal that lets a restarted hub resume."""

from __future__ import annotations

import numpy as np
import torch

from edge_runtime.learning.models import FeatureExtractor
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.messages import FeatureBatch, extractor_message, feature_chunk
from server_hub.async_mode.rules import AsyncConfig
from server_hub.async_mode.service import AsyncHubService
from server_hub.hub import Hub
from server_hub.service import ServiceConfig
from server_hub.trainer import ServerTrainConfig


class FakeLink:
    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, **_) -> None:
        self.sent.append((topic, payload))

    def acked(self) -> list[str]:
        return [mid for _, p in self.sent
                for mid in wire.decode_message(p, max_bytes=1 << 20).meta.get("msg_ids", [])]


def service(tmp_path) -> tuple[AsyncHubService, FakeLink]:
    torch.set_num_threads(1)
    link = FakeLink()
    hub = Hub(10, ServerTrainConfig(batch_size=8, device="cpu"))
    svc = AsyncHubService(link, hub, ServiceConfig(str(tmp_path)), AsyncConfig(max_updates=5),
                          None, None)
    return svc, link


def hello(device: str) -> bytes:
    return wire.encode_message("hello", device, 0, {}, msg_id="h",
                               meta={"num_samples": 6, "num_classes": 10, "codec": "fp32",
                                     "completed_round": -1})


def upload(device: str, update: int, seed: int = 0) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(6)
    batch = FeatureBatch(ids, torch.rand(6, 16, 8, 8, generator=g), torch.zeros(6, 10), ids % 10)
    uid = f"r{update}-{seed}"
    ext = {k: v.clone() for k, v in FeatureExtractor().state_dict().items()}
    return [
        feature_chunk(device, update, f"{uid}:0", 0, 1, batch, "fp32"),
        extractor_message(device, update, f"{uid}:extractor", ext),
        wire.encode_message("upload_done", device, update, {}, msg_id=f"{uid}:done",
                            meta={"num_samples": 6, "num_chunks": 1, "upload_id": uid,
                                  "edge_accuracy": 0.5}),
    ]


def send(svc: AsyncHubService, device: str, payloads: list[bytes]) -> None:
    for p in payloads:
        svc.intake.on_up(topics.up(device), p)


def test_merge_on_complete_upload_stale_resends_and_hostile_input(tmp_path):
    svc, link = service(tmp_path)
    before = {k: v.clone() for k, v in svc.hub.model.state_dict().items()}
    send(svc, "d", upload("d", 0))  # before hello
    svc.intake.on_up(topics.up("d"), b"\x80\x04pickle")
    assert dict(svc.intake.rejected) == {"unknown_device": 3, "bad_magic": 1}
    assert svc.ahub.version == 0
    send(svc, "d", [hello("d")])
    first = upload("d", 0)
    send(svc, "d", first[:2])
    assert svc.ahub.version == 0  # not complete yet: nothing merged
    send(svc, "d", first[2:])
    assert svc.ahub.version == 1 and svc.merged == {"d": 0}
    assert svc.ahub.slots["d"].edge_accuracy == 0.5
    send(svc, "d", first[:1])  # a resend whose ack was lost: acked again, not re-merged
    assert svc.intake.rejected["stale_update"] == 1 and svc.ahub.version == 1
    assert link.acked().count(wire.decode_message(first[0], max_bytes=1 << 20).msg_id) == 2
    for k, v in svc.hub.model.state_dict().items():  # the network thread never trains
        assert torch.equal(v, before[k])
    send(svc, "d", upload("d", 1, seed=1))
    assert svc.ahub.version == 2 and svc.merged == {"d": 1}
    assert svc.intake.journal.rounds() == [1]  # only the newest complete upload stays on disk
    wiped = wire.encode_message("hello", "d", 0, {}, msg_id="h2",
                                meta={"num_samples": 6, "num_classes": 10, "codec": "fp32",
                                      "completed_round": -1})
    send(svc, "d", [hello("d")])  # its first hello again (a retained re-delivery): no effect
    assert svc.merged == {"d": 1}
    send(svc, "d", [wiped] + upload("d", 0, seed=5))  # lost its state: counts from 0 again
    assert svc.ahub.version == 3 and svc.merged == {"d": 0} and svc.intake.journal.rounds() == [0]


def test_a_restarted_async_hub_replays_the_newest_uploads(tmp_path):
    svc, _ = service(tmp_path)
    send(svc, "d", [hello("d")] + upload("d", 0) + upload("d", 1, seed=1))
    send(svc, "e", [hello("e")] + upload("e", 0, seed=2)[:2])  # incomplete when it crashed
    again, _ = service(tmp_path)
    for u in again.intake.journal.rounds():  # what run() does before it waits for devices
        again.intake.replay(u)
    assert again.merged == {"d": 1} and "e" not in again.merged
    feats = again.ahub.slots["d"].features.features
    assert np.allclose(feats.numpy(), svc.ahub.slots["d"].features.features.numpy())
    send(again, "e", upload("e", 0, seed=2)[2:])  # the rest arrives: e's upload completes
    assert again.merged == {"d": 1, "e": 0}
