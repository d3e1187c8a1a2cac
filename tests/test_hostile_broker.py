"""Broken input from an enrolled-looking device, through a real broker, mid-round: each
case is rejected and counted by reason, the model stays as it was, duplicates and
out-of-order chunks are stored once, and the round still completes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zstandard as zstd
from polling import wait_for
from test_mqtt_federation import make_hub
from test_wire import edit_spec, frame, replace_blob, split

from edge_runtime.learning.models import FeatureExtractor
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.messages import FeatureBatch, extractor_message, feature_chunk

pytestmark = pytest.mark.mqtt
DEV = "mallory"


def batch(lo: int, hi: int) -> FeatureBatch:
    g = torch.Generator().manual_seed(lo)
    n = hi - lo
    return FeatureBatch(torch.arange(lo, hi), torch.rand((n, 16, 8, 8), generator=g),
                        torch.randn((n, 10), generator=g), torch.arange(lo, hi) % 10)


def exact(a: np.ndarray) -> bytes:
    """An int64 tensor blob as the `exact` codec writes it."""
    return zstd.ZstdCompressor().compress(a.astype("<i8").tobytes())


def upload(rnd: int, tag: str) -> list[bytes]:
    """Three 2-sample chunks, the extractor and upload_done."""
    chunks = [feature_chunk(DEV, rnd, f"{tag}:{i}", i, 3, batch(2 * i, 2 * i + 2), "q8")
              for i in range(3)]
    ext = extractor_message(DEV, rnd, f"{tag}:extractor", FeatureExtractor().state_dict())
    done = wire.encode_message("upload_done", DEV, rnd, {}, msg_id=f"{tag}:done",
                               meta={"num_samples": 6, "num_chunks": 3, "upload_id": tag})
    return [*chunks, ext, done]


def hostile(rnd: int, old_round: list[bytes], max_payload: int) -> list[tuple[bytes, str]]:
    good = feature_chunk(DEV, rnd, "h:0", 0, 3, batch(0, 2), "q8")
    nan = zstd.ZstdCompressor().compress(np.full((2, 10), np.nan, "<f2").tobytes())  # fp16
    big = feature_chunk(DEV, rnd, "h:0", 0, 3, batch(0, 90), "fp32")
    assert len(big) > max_payload
    return [
        (edit_spec(good, "features", shape=[2, 16, 8, 9]), "shape"),
        (edit_spec(good, "ids", dtype="int32"), "dtype"),
        (replace_blob(good, 2, nan), "nonfinite"),
        (replace_blob(good, 0, bytes(16)), "corrupt"),
        (frame({**split(good)[0], "crc32": split(good)[0]["crc32"] ^ 1}, split(good)[1],
               crc=False), "checksum"),
        (good[:-7], "truncated"),
        (big, "too_large"),
        (feature_chunk(DEV, rnd + 1, "h:0", 0, 3, batch(0, 2), "q8"), "future_round"),
        (old_round[0], "stale_round"),  # replay of the previous round's chunk
        (feature_chunk("alice", rnd, "h:0", 0, 3, batch(0, 2), "q8"), "spoofed"),
        (replace_blob(good, 1, exact(np.array([10, 3]))), "schema"),  # label out of range
        (replace_blob(good, 0, exact(np.array([4, 0]))), "schema"),  # duplicate ids (delta)
    ]


def test_broken_input_mid_round_is_counted_and_changes_nothing(broker, tmp_path):
    service, records = make_hub(broker, tmp_path, rounds=2, min_devices=1)
    max_payload = service.cfg.max_payload
    hub_thread = threading.Thread(target=service.run)
    hub_thread.start()
    link = MqttLink(LinkConfig(broker.url, f"{DEV}-{tmp_path.name}", session_expiry=0,
                               max_packet_size=4 * max_payload))
    link.connect()
    try:
        hello = wire.encode_message("hello", DEV, 0, {}, msg_id="hello", meta={
            "num_samples": 6, "num_classes": 10, "codec": "q8"})
        link.publish(topics.up(DEV), hello, retain=True)
        assert wait_for(lambda: service.intake.round == 0 and service.intake.phase == "collect", 60)
        round0 = upload(0, "r0-a")
        for m in round0:
            link.publish(topics.up(DEV), m)
        assert wait_for(lambda: service.intake.round == 1 and service.intake.phase == "collect", 60)
        before = {k: v.clone() for k, v in service.hub.model.state_dict().items()}
        cases = hostile(1, round0, max_payload)
        for payload, _ in cases:
            link.publish(topics.up(DEV), payload)
        expected: dict[str, int] = {}
        for _, why in cases:
            expected[why] = expected.get(why, 0) + 1
        rejected = service.intake.rejected
        assert wait_for(lambda: dict(rejected) == expected, 20), rejected
        for k, v in service.hub.model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert service.hub.bank.devices == []  # nothing of round 1 was stored
        # The real upload, out of order and with a duplicate, still completes the round.
        c0, c1, c2, ext, done = upload(1, "r1-b")
        for m in (c2, c0, c0, c1, ext, c1, done):
            link.publish(topics.up(DEV), m)
        hub_thread.join(60)
        assert not hub_thread.is_alive() and [r.round for r in records] == [0, 1]
        assert service.hub.bank.get(DEV).ids.tolist() == list(range(6))  # each sample once
        assert dict(service.intake.rejected) == expected  # duplicates are not rejections
    finally:
        link.publish(topics.up(DEV), b"", retain=True)
        link.close()
        service.stop()
