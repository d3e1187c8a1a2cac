"""Model delivery's replies on the devices' own model topics (``gkt/v1/dev/ID/model``):
what the hub that delivers (one hub, or rank 0 of hub workers) accepts there, and what it
refuses. No network: a stand-in link records subscriptions and publishes."""

from __future__ import annotations

import time

import pytest

from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.model_transfer import (
    ModelFile,
    ack_message,
    model_messages,
    request_message,
)
from server_hub.hub import Hub
from server_hub.intake import MODEL_REPLY_BYTES
from server_hub.service import ServiceConfig, make_intake
from server_hub.trainer import ServerTrainConfig

MODEL = ModelFile(3, "fp32", b"onnx bytes")


class Link:
    connected = True

    def __init__(self) -> None:
        self.subs: dict[str, object] = {}
        self.sent: list[tuple[str, bytes]] = []

    def subscribe(self, topic, handler, qos=1, timeout=10.0) -> None:
        self.subs[topic] = handler

    def publish(self, topic, payload, qos=1, retain=False, wait=True, timeout=30.0) -> None:
        self.sent.append((topic, payload))


class Delivery:
    payload_for = None

    def __init__(self, fail: bool = False) -> None:
        self.got: list[tuple[str, str, int]] = []
        self.fail = fail

    def on_message(self, device: str, msg: wire.Message) -> None:
        if self.fail:
            raise RuntimeError("export blew up")
        self.got.append((device, msg.kind, msg.round))


@pytest.fixture(scope="module")
def hub():
    return Hub(10, ServerTrainConfig(device="cpu"))


@pytest.fixture
def intake(hub, tmp_path):
    from edge_runtime.learning.data import DataConfig

    intake = make_intake(Link(), hub, ServiceConfig(str(tmp_path)), DataConfig("digits"))
    intake.attach_delivery(Delivery())
    return intake


def refusals(intake) -> list[tuple[str, str]]:
    out = []
    for topic, payload in intake.link.sent:
        msg = wire.decode_message(payload, max_bytes=1 << 16)
        if msg.kind == "reject":
            out.append((topic, msg.meta["reason"]))
    return out


def test_model_topics_name_their_device():
    assert topics.model("pi-4.a_b") == "gkt/v1/dev/pi-4.a_b/model"
    assert topics.MODEL_WILDCARD == "gkt/v1/dev/+/model"
    assert topics.device_from_topic("gkt/v1/dev/pi-4.a_b/model", "model") == "pi-4.a_b"
    assert topics.device_from_topic("gkt/v1/dev/pi-4.a_b/up") == "pi-4.a_b"
    for topic, leaf in (("gkt/v1/dev/dev0/model", "up"), ("gkt/v1/dev/dev0/up", "model"),
                        ("gkt/v1/dev/dev0/down", "model"), ("gkt/v1/dev//model", "model"),
                        ("gkt/v1/dev/a/b/model", "model"), ("gkt/v1/dev/+/model", "model"),
                        ("gkt/v1/dev/$SYS/model", "model"), ("gkt/v2/dev/dev0/model", "model"),
                        ("gkt/v1/dev/dev0/model/x", "model"), (None, "model")):
        with pytest.raises(wire.WireError) as err:
            topics.device_from_topic(topic, leaf)
        assert err.value.reason == "bad_topic"
    with pytest.raises(ValueError, match="wildcard"):
        topics.model("dev+1")


def test_the_delivering_hub_subscribes_unshared_and_sizes_messages_per_device(intake):
    assert intake.link.subs[topics.MODEL_WILDCARD] == intake.on_model
    assert not any(t.startswith("$share/") for t in intake.link.subs)
    assert intake.delivery.payload_for == intake.payload_for


def test_acks_and_requests_on_the_model_topic_reach_the_delivery(intake):
    seen = []

    class Observer:  # monitoring: every accepted device message, whatever its topic
        def on_accepted(self, device, msg, size, merged, completed):
            seen.append((device, msg.kind, size))

    intake.observers.append(Observer())
    ack, req = ack_message("dev0", MODEL), request_message("dev1", "n1")
    intake.on_model(topics.model("dev0"), ack)
    intake.on_model(topics.model("dev1"), req)
    intake.on_model(topics.model("dev1"), b"")  # a cleared retained message: nothing
    intake.on_model(topics.model("dev0"), ack_message("dev1", MODEL))  # refused: not seen
    assert intake.delivery.got == [("dev0", "model_ack", 3), ("dev1", "model_request", 0)]
    assert seen == [("dev0", "model_ack", len(ack)), ("dev1", "model_request", len(req))]
    assert intake.rejected == {"spoofed": 1}


def test_a_device_older_than_the_model_topic_still_acks_on_up(intake):
    """One hub keeps taking ``model_ack`` / ``model_request`` on ``up``."""
    intake.on_up(topics.up("dev0"), ack_message("dev0", MODEL))
    assert intake.delivery.got == [("dev0", "model_ack", 3)]


@pytest.mark.parametrize("topic, payload, reason", [
    # dev1's header on dev0's topic: the ACL lets dev0 write only there, so it is dev0
    # claiming to be dev1
    (topics.model("dev0"), ack_message("dev1", MODEL), "spoofed"),
    (topics.model("dev0"), request_message("dev1", "n1"), "spoofed"),
    # what belongs on up (or nowhere near the hub) is refused on the model topic
    (topics.model("dev0"), wire.encode_message("logits_request", "dev0", 1, {}, msg_id="r",
                                               meta={"round": 1}), "unexpected"),
    (topics.model("dev0"), model_messages("dev0", MODEL, 12 * 1024)[0], "unexpected"),
    (topics.model("dev0"), b"GKT\x01 not a message", None),
    (topics.model("dev0"), b"x" * (MODEL_REPLY_BYTES + 1), None),
    (topics.model("dev0"), ack_message("dev0", MODEL)[:-3], None),
])
def test_hostile_model_replies_are_refused_and_never_reach_the_delivery(
        intake, topic, payload, reason, caplog):
    intake.on_model(topic, payload)  # never raises
    assert intake.delivery.got == []
    assert sum(intake.rejected.values()) == 1, intake.rejected
    if reason is not None:
        assert intake.rejected[reason] == 1, intake.rejected
    assert "rejected message on gkt/v1/dev/dev0/model" in caplog.text
    assert [t for t, _ in refusals(intake)] == [topics.down("dev0")]  # told why, on its own


def test_a_topic_naming_no_device_is_counted_and_answers_nobody(intake):
    intake.on_model("gkt/v1/dev/a/b/model", ack_message("a", MODEL))
    assert intake.rejected["bad_topic"] == 1 and intake.link.sent == []


def test_a_failing_delivery_does_not_take_the_network_thread_down(hub, tmp_path, caplog):
    from edge_runtime.learning.data import DataConfig

    intake = make_intake(Link(), hub, ServiceConfig(str(tmp_path)), DataConfig("digits"))
    intake.attach_delivery(Delivery(fail=True))
    intake.on_model(topics.model("dev0"), request_message("dev0", "n1"))
    assert intake.rejected["failed"] == 1 and "export blew up" in caplog.text


def test_a_device_asking_again_and_again_gets_one_model_per_interval(tmp_path):
    """A model_request is a few bytes in and the whole model out: a device that repeats it
    (a loop, a hostile one) is answered once per ``request_interval``."""
    from polling import wait_for

    from server_hub.delivery.models import DeliveryConfig, ModelDelivery

    link = Link()
    delivery = ModelDelivery(link, tmp_path, DeliveryConfig(request_interval=0.5))
    delivery.export = lambda devices: MODEL.round  # the checkpoint's models, exported
    delivery.models["devA"] = {"fp32": MODEL}
    delivery.models["devB"] = {"fp32": MODEL}
    ask = wire.decode_message(request_message("devA", "n1"), max_bytes=1 << 16)

    def sends(device: str) -> int:
        return sum(t == topics.down(device) for t, _ in link.sent)

    for _ in range(50):
        delivery.on_message("devA", ask)
    delivery.on_message("devB", wire.decode_message(request_message("devB", "n2"),
                                                    max_bytes=1 << 16))
    assert wait_for(lambda: sends("devA") == 1 and sends("devB") == 1)
    assert not wait_for(lambda: sends("devA") > 1, timeout=0.3)  # the 49 repeats: nothing
    assert wait_for(lambda: delivery._asked["devA"] + 0.5 < time.monotonic(), timeout=2)
    delivery.on_message("devA", ask)  # after the interval: answered again
    assert wait_for(lambda: sends("devA") == 2)
