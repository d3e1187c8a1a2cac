"""One bad device must never stop the federation: wire-valid but poisonous uploads from an
enrolled device, through a real Mosquitto with logins and ACL. Each is refused before it
is acknowledged (or quarantined at training), the device is told why, the hub keeps
running, every honest sample is trained on, the model is exactly the one trained on the
honest device alone, and the counters count what was stored."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from polling import wait_for
from test_mqtt_federation import DATA, prepare_test
from test_security import secure_broker

from edge_runtime.learning.data import make_loader
from edge_runtime.learning.models import FeatureExtractor
from edge_runtime.learning.train import FeatureBatch
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.messages import extractor_message, feature_chunk, parse_feature_chunk
from server_hub.admission import AdmissionLimits
from server_hub.broker.enrol import add_device
from server_hub.feature_bank import DeviceFeatures
from server_hub.hub import Hub
from server_hub.monitoring.metrics import FleetCollector
from server_hub.monitoring.snapshot import FleetObserver
from server_hub.service import HubService, ServiceConfig
from server_hub.trainer import ServerTrainConfig

pytestmark = pytest.mark.mqtt
TRAIN = ServerTrainConfig(epochs=1, batch_size=4, device="cpu")
HONEST, BAD = "alice", "mallory"
N = 6  # samples per device


def batch(lo: int, hi: int, size: int = 8, scale: float = 1.0) -> FeatureBatch:
    g = torch.Generator().manual_seed(lo)
    n = hi - lo
    return FeatureBatch(torch.arange(lo, hi), scale * torch.rand((n, 16, size, size), generator=g),
                        torch.randn((n, 10), generator=g), torch.arange(lo, hi) % 10)


def hello(dev: str, samples: int = N, **meta) -> bytes:
    return wire.encode_message("hello", dev, 0, {}, msg_id=f"hello-{dev}", meta={
        "num_samples": samples, "num_classes": 10, "codec": "q8", **meta})


def done(dev: str, rnd: int, tag: str, samples: int = N, chunks: int = 3) -> bytes:
    return wire.encode_message("upload_done", dev, rnd, {}, msg_id=f"{tag}:done", meta={
        "num_samples": samples, "num_chunks": chunks, "upload_id": tag})


def upload(dev: str, rnd: int, tag: str, **kw) -> list[bytes]:
    """Three 2-sample chunks, the extractor and upload_done."""
    codec = kw.pop("codec", "q8")
    chunks = [feature_chunk(dev, rnd, f"{tag}:{i}", i, 3, batch(2 * i, 2 * i + 2, **kw), codec)
              for i in range(3)]
    ext = extractor_message(dev, rnd, f"{tag}:extractor", FeatureExtractor().state_dict())
    return [*chunks, ext, done(dev, rnd, tag)]


def honest_model() -> dict[str, torch.Tensor]:
    """The server model after one round trained on the honest device alone (on what its
    q8 upload decodes to)."""
    hub = Hub(10, TRAIN)
    for m in upload(HONEST, 0, "a0")[:3]:
        b = parse_feature_chunk(wire.decode_message(m, max_bytes=1 << 22))
        hub.receive_features(HONEST, DeviceFeatures(b.ids, b.features, b.logits, b.labels))
    hub.train([HONEST])
    return hub.model.state_dict()


class Fleet:
    """A hub service on an enrolled broker, with logged-in links for alice and mallory."""

    def __init__(self, broker_dir, broker_factory, tmp_path, **cfg) -> None:
        creds = {d: add_device(broker_dir, d).password for d in (HONEST, BAD)}
        self.broker, access = secure_broker(broker_factory, broker_dir)
        hub_link = MqttLink(LinkConfig(self.broker.url, "gkt-hub", access.username,
                                       access.password))
        hub_link.connect()
        self.records: list = []
        self.service = HubService(
            hub_link, Hub(10, TRAIN), ServiceConfig(str(tmp_path / "hub"), **{
                "rounds": 1, "min_devices": 1, "round_deadline": 60.0, "start_timeout": 60,
                **cfg}), DATA, make_loader(prepare_test(), 256, shuffle=False), self.records.append)
        self.fleet = FleetObserver()
        self.service.add_observer(self.fleet)
        self.links = {d: MqttLink(LinkConfig(self.broker.url, d, d, creds[d],
                                             max_packet_size=1 << 20)) for d in creds}
        self.told: dict[str, list[dict]] = {d: [] for d in creds}
        for d, link in self.links.items():
            link.connect()
            link.subscribe(topics.down(d), lambda t, p, d=d: self._down(d, p))
        self.thread = threading.Thread(target=self._run)
        self.rc: int | None = None

    def _run(self) -> None:
        self.rc = self.service.run()

    def _down(self, dev: str, payload: bytes) -> None:
        msg = wire.decode_message(payload, max_bytes=1 << 22)
        if msg.kind == "reject":
            self.told[dev].append(msg.meta)

    def send(self, dev: str, *payloads: bytes) -> None:
        for p in payloads:  # hellos retained, as devices send them (the hub may start later)
            kind = wire.decode_message(p, max_bytes=1 << 22).kind if len(p) < 4096 else ""
            self.links[dev].publish(topics.up(dev), p, retain=kind == "hello")

    def close(self) -> None:
        for d in self.links:
            self.links[d].publish(topics.up(d), b"", retain=True)
        self.service.stop()
        self.thread.join(30)
        for link in (*self.links.values(), self.service.link):
            link.close()


@pytest.fixture
def fleet(broker_dir, broker_factory, tmp_path, request):
    f = Fleet(broker_dir, broker_factory, tmp_path, **getattr(request, "param", {}))
    yield f
    f.close()


def assert_trained_on_honest_only(f: Fleet, received: int = N) -> None:
    assert f.rc == 0 and [r.round for r in f.records] == [0]
    model = f.service.hub.model.state_dict()
    assert all(bool(v.float().isfinite().all()) for v in model.values())
    for k, v in honest_model().items():
        assert torch.equal(model[k], v), k  # as if mallory had sent nothing
    assert f.service.hub.bank.get(HONEST).ids.tolist() == list(range(N))  # every honest sample
    assert f.fleet.snapshot(f.service)["samples_received"] == received  # stored, not claimed


def test_poisoned_uploads_are_refused_before_ack_and_the_round_goes_on(fleet):
    f = fleet
    f.send(HONEST, hello(HONEST))
    f.send(BAD, hello(BAD))
    f.thread.start()
    assert wait_for(lambda: f.service.intake.phase == "collect", 60)
    zeros = FeatureBatch(torch.arange(0, 4000), torch.zeros((4000, 16, 8, 8)),
                         torch.zeros((4000, 10)), torch.zeros(4000, dtype=torch.int64))
    cases = [
        (feature_chunk(BAD, 0, "m1:0", 0, 3, batch(0, 2, size=16), "q8"), "feature_shape"),
        (feature_chunk(BAD, 0, "m2:0", 0, 3, batch(0, 2, scale=3e38), "fp32"), "magnitude"),
        (feature_chunk(BAD, 0, "m3:0", 0, 2**31 - 1, batch(0, 2), "q8"), "too_many_chunks"),
        (done(BAD, 0, "m4", samples=2**31 - 1, chunks=2**31 - 1), "too_many_chunks"),
        (feature_chunk(BAD, 0, "m5:0", 0, 3, batch(0, 7), "q8"), "count_mismatch"),
    ]
    for payload, _ in cases:
        f.send(BAD, payload)
    # 4,000 all-zero samples: 16 MB of feature maps from a few hundred bytes. The hello
    # below allows that many samples, so it is the expansion bound that refuses them.
    f.send(BAD, hello(BAD, samples=5000))
    bomb = feature_chunk(BAD, 0, "m6:0", 0, 1, zeros, "q8")
    f.send(BAD, bomb)
    cases.append((bomb, "expansion"))
    # an upload complete in every part whose upload_done lies about its sample count
    *parts, _ = upload(BAD, 0, "m7")
    f.send(BAD, *parts, done(BAD, 0, "m7", samples=2**31 - 1))
    cases.append((b"", "count_mismatch"))
    want: dict[str, int] = {}
    for _, why in cases:
        want[why] = want.get(why, 0) + 1
    assert wait_for(lambda: dict(f.service.intake.rejected) == want, 30), f.service.intake.rejected
    assert wait_for(lambda: {m["reason"] for m in f.told[BAD]} == set(want), 10), f.told
    assert all(not m["fatal"] for m in f.told[BAD])
    f.send(BAD, hello(BAD, samples=10**7))  # more than the hub takes: a retry cannot help
    assert wait_for(lambda: f.told[BAD][-1]["reason"] == "too_many_samples", 10)
    assert f.told[BAD][-1]["fatal"]
    want["too_many_samples"] = 1
    assert BAD not in f.service.intake.uploads and BAD not in f.service.hub.bank.devices
    spill = f.service.hub.bank.resident_feature_bytes()
    assert spill == 0  # nothing of mallory's was kept
    f.send(HONEST, *upload(HONEST, 0, "a0"))
    f.thread.join(60)
    assert_trained_on_honest_only(f)
    assert f.told[HONEST] == []
    metrics = "".join(str(m) for m in FleetCollector(f.service, f.fleet).collect())
    assert "count_mismatch" in metrics and "expansion" in metrics


@pytest.mark.parametrize("fleet", [{"admission": AdmissionLimits(max_feature_abs=float("inf"))}],
                         indirect=True)
def test_what_admission_lets_through_is_quarantined_at_training(fleet, caplog):
    """With the magnitude bound lifted, 3e38 features reach training: the step goes
    non-finite, the model is put back, mallory's upload is dropped for the round (counted,
    logged, told) and the round trains on alice alone."""
    f = fleet
    f.send(HONEST, hello(HONEST))
    f.send(BAD, hello(BAD))
    f.thread.start()
    assert wait_for(lambda: f.service.intake.phase == "collect", 60)
    with caplog.at_level(logging.WARNING, "gkt.hub"):
        f.send(BAD, *upload(BAD, 0, "m0", scale=3e38, codec="fp32"))
        f.send(HONEST, *upload(HONEST, 0, "a0"))
        f.thread.join(120)
    assert dict(f.service.intake.quarantined) == {"nonfinite_training": 1}
    assert "quarantined mallory's upload (nonfinite_training)" in caplog.text
    assert wait_for(lambda: [m["reason"] for m in f.told[BAD]] == ["quarantined"], 10)
    assert_trained_on_honest_only(f, received=2 * N)  # both uploads arrived; one was used
    assert f.fleet.snapshot(f.service)["quarantined"] == {"nonfinite_training": 1}


def test_a_poisoned_journal_is_quarantined_on_replay_not_a_crash_loop(fleet, caplog):
    """A message accepted before a restart (e.g. by an older hub) that fails now is
    quarantined with a log line; the hub replays the rest and finishes the round."""
    f = fleet
    for dev in (BAD, HONEST):  # the crashed hub had registered both (registry.json)
        f.service.intake.registry.hello(dev, {"num_samples": N, "num_classes": 10,
                                              "codec": "q8"}, 0)
    journal = f.service.intake.journal
    journal.record(0, BAD, feature_chunk(BAD, 0, "m:0", 0, 3, batch(0, 2, size=16), "q8"))
    good = upload(HONEST, 0, "a0")
    for m in good[:2]:  # alice's first two chunks were acked before the "crash"
        journal.record(0, HONEST, m)
    f.send(HONEST, hello(HONEST))
    f.send(BAD, hello(BAD))
    with caplog.at_level(logging.WARNING, "gkt.hub"):
        f.thread.start()
        assert wait_for(lambda: f.service.intake.phase == "collect", 60)
        f.send(HONEST, *good[2:])
        f.thread.join(60)
    assert "quarantined a replayed message on gkt/v1/dev/mallory/up (feature_shape)" in \
        caplog.text
    assert dict(f.service.intake.quarantined) == {"replay_feature_shape": 1}
    assert_trained_on_honest_only(f)


def test_refusal_with_a_fatal_reason_reaches_the_device(fleet):
    f = fleet
    f.thread.start()
    f.send(BAD, wire.encode_message("hello", BAD, 0, {}, msg_id="h", meta={
        "num_samples": N, "num_classes": 7, "codec": "q8"}))
    assert wait_for(lambda: f.told[BAD], 20)
    assert f.told[BAD][0]["reason"] == "wrong_run" and f.told[BAD][0]["fatal"]
    assert BAD not in f.service.intake.known
