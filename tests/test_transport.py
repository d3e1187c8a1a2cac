"""MqttLink and ReliableSender; all but the pure ones against a real Mosquitto."""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from polling import wait_for

from edge_runtime.mqtt import paho_patch
from edge_runtime.mqtt.link import LinkConfig, MqttLink, parse_url, publish_packet_size
from edge_runtime.mqtt.reliable import ReliableSender
from server_hub.broker.mosquitto import free_port


class Inbox:
    """A thread-safe handler that records (topic, payload)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.items.append((topic, payload))

    @property
    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p for _, p in self.items]


# -- pure ------------------------------------------------------------------------------------
@pytest.mark.parametrize("url, expected", [
    ("mqtt://h:1999", ("h", 1999, False)),
    ("mqtt://h", ("h", 1883, False)),
    ("mqtts://h", ("h", 8883, True)),
    ("mqtts://10.0.0.2:8884/", ("10.0.0.2", 8884, True)),
    ("mqtt://[::1]:1884", ("::1", 1884, False)),
])
def test_parse_url(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["http://h:1", "h:1883", "mqtt://", "mqtt://h:99999",
                                 "mqtt://h:0", "mqtt://h:x", "mqtt://h/topic",
                                 "mqtt://u:p@h:1883"])
def test_bad_url_is_a_clear_error(url):
    with pytest.raises(ValueError, match="broker URL"):
        parse_url(url)


def test_publish_packet_size_counts_the_whole_packet():
    # fixed header 1 + remaining-length varint 2 + topic 2+2 + packet id 2 + properties 1
    assert publish_packet_size("tt", 992, qos=1) == 1002
    assert publish_packet_size("tt", 100, qos=0) == 1 + 1 + 4 + 1 + 100
    assert publish_packet_size("t", 2_000_000) - 2_000_000 == 1 + 3 + 3 + 2 + 1


def test_tls_files_need_an_mqtts_url():
    with pytest.raises(ValueError, match="mqtts://"):
        MqttLink(LinkConfig("mqtt://h:1883", "c", ca_file="ca.pem"))


# -- against a real broker -------------------------------------------------------------------
@pytest.mark.mqtt
def test_publish_subscribe_round_trip_and_counters(broker, make_link, topic):
    a, b = make_link(broker.url, "a"), make_link(broker.url, "b")
    inbox = Inbox()
    b.subscribe(f"{topic}/x", inbox)  # returns once the broker granted it
    a.publish(f"{topic}/x", b"hello")
    a.publish(f"{topic}/x", b"world!", wait=False)
    assert wait_for(lambda: len(inbox.items) == 2, 5)
    assert inbox.items == [(f"{topic}/x", b"hello"), (f"{topic}/x", b"world!")]
    assert (a.msgs_sent, a.bytes_sent) == (2, 11)
    assert (b.msgs_received, b.bytes_received) == (2, 11)


@pytest.mark.mqtt
def test_overlapping_and_shared_subscriptions_each_get_a_message_once(broker, make_link, topic):
    a, b = make_link(broker.url, "a"), make_link(broker.url, "b")
    wide, exact, shared = Inbox(), Inbox(), Inbox()
    b.subscribe(f"{topic}/#", wide)
    b.subscribe(f"{topic}/dev/1", exact)
    b.subscribe(f"$share/hub/{topic}/dev/+", shared)
    a.publish(f"{topic}/dev/1", b"m")
    assert wait_for(lambda: len(wide.items) + len(exact.items) + len(shared.items) == 3, 5)
    time.sleep(0.1)  # no late duplicates either
    assert wide.payloads == exact.payloads == shared.payloads == [b"m"]


@pytest.mark.mqtt
def test_oversized_payload_is_refused_locally_and_the_link_survives(broker, make_link, topic):
    a, b = make_link(broker.url, "a"), make_link(broker.url, "b")
    inbox = Inbox()
    b.subscribe(f"{topic}/x", inbox)
    with pytest.raises(ValueError, match="exceeds the maximum packet size"):
        a.publish(f"{topic}/x", b"x" * a.max_packet_size)
    a.publish(f"{topic}/x", b"small")
    assert wait_for(lambda: inbox.payloads == [b"small"], 5)


@pytest.mark.mqtt
def test_the_largest_allowed_packet_passes_a_broker_with_the_same_limit(broker_factory,
                                                                        make_link, topic):
    b = broker_factory(max_packet_size=1000)
    # Our limit is larger, but the broker announces its own in the CONNACK.
    a, r = make_link(b.url, "a", max_packet_size=4096), make_link(b.url, "r")
    assert a.max_packet_size == 1000
    inbox = Inbox()
    r.subscribe(f"{topic}/x", inbox)
    fits = max(n for n in range(1000) if publish_packet_size(f"{topic}/x", n) <= 1000)
    a.publish(f"{topic}/x", b"y" * fits)
    assert wait_for(lambda: inbox.payloads == [b"y" * fits], 5)
    with pytest.raises(ValueError, match="maximum packet size"):
        a.publish(f"{topic}/x", b"y" * (fits + 1))


@pytest.mark.mqtt
def test_publish_and_wait_inside_a_handler_refuses_to_deadlock(broker, make_link, topic):
    a = make_link(broker.url, "a")
    errors = []

    def handler(t, p):
        try:
            a.publish(f"{topic}/reply", p)
        except RuntimeError as err:
            errors.append(str(err))
            a.publish(f"{topic}/reply", p, wait=False)

    replies = Inbox()
    a.subscribe(f"{topic}/req", handler)
    a.subscribe(f"{topic}/reply", replies)
    a.publish(f"{topic}/req", b"ping")
    assert wait_for(lambda: replies.payloads == [b"ping"], 5)
    assert errors and "would deadlock" in errors[0]


def test_unreachable_broker_is_a_clear_error():
    link = MqttLink(LinkConfig(f"mqtt://127.0.0.1:{free_port()}", "nobody"))
    with pytest.raises(ConnectionError, match="cannot reach MQTT broker at 127.0.0.1:"):
        link.connect(timeout=2)


def test_a_silent_server_is_a_timeout_naming_the_broker():
    with socket.socket() as server:  # accepts TCP, never answers MQTT
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        link = MqttLink(LinkConfig(f"mqtt://127.0.0.1:{port}", "nobody"))
        with pytest.raises(ConnectionError, match=f"no CONNACK .*127.0.0.1:{port}"):
            link.connect(timeout=0.5)


@pytest.mark.mqtt
def test_messages_queued_while_offline_arrive_on_reconnect(broker, make_link, topic):
    sub = make_link(broker.url, "sub")
    sub.subscribe(f"{topic}/x", Inbox())
    sub.close()  # the persistent session stays on the broker
    pub = make_link(broker.url, "pub")
    for i in range(5):
        pub.publish(f"{topic}/x", b"%d" % i)
    inbox = Inbox()
    back = make_link(broker.url, "sub", connect=False)  # same client id
    back.subscribe(f"{topic}/x", inbox)
    back.connect()
    assert wait_for(lambda: len(inbox.items) == 5, 5)
    assert inbox.payloads == [b"0", b"1", b"2", b"3", b"4"]


@pytest.mark.mqtt
def test_link_reconnects_by_itself_after_the_broker_is_killed(broker, make_link, topic, caplog):
    fast = {"reconnect_min": 0.1, "reconnect_max": 0.5}
    a, b = make_link(broker.url, "a", **fast), make_link(broker.url, "b", **fast)
    inbox = Inbox()
    b.subscribe(f"{topic}/x", inbox)
    with caplog.at_level(logging.INFO, "gkt.mqtt"):
        broker.broker.kill()  # kill -9: its in-memory sessions and queues are gone
        assert wait_for(lambda: not a.connected and not b.connected, 5)
        broker.broker.start()
        assert wait_for(lambda: a.connected and b.connected, 10)
    assert "lost the connection" in caplog.text and "reconnected" in caplog.text
    # b subscribed again on its own: what a publishes now arrives.
    assert wait_for(lambda: (a.publish(f"{topic}/x", b"after"), inbox.payloads)[1], 5)
    assert set(inbox.payloads) == {b"after"}


# -- ReliableSender --------------------------------------------------------------------------
class LossyReceiver:
    """Dedups by msg id (as the hub does), tracks how many sent messages are still
    un-acked, and loses a share of its acks."""

    def __init__(self, sender: ReliableSender, loss: float, seed: int = 0) -> None:
        self.sender, self.loss, self.rng = sender, loss, random.Random(seed)
        self.seen: list[str] = []  # every arrival, duplicates included
        self.unique: dict[str, bytes] = {}
        self.acked: set[str] = set()
        self.max_unacked = 0
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        msg_id = payload.split(b":")[0].decode()
        with self.lock:
            self.seen.append(msg_id)
            self.unique.setdefault(msg_id, payload)
            self.max_unacked = max(self.max_unacked, len(set(self.unique) - self.acked))
            if self.rng.random() < self.loss:
                return  # this ack is lost
            self.acked.add(msg_id)
        self.sender.ack(msg_id)


@pytest.mark.mqtt
def test_reliable_sender_delivers_everything_despite_lost_acks(broker, make_link, topic):
    a, b = make_link(broker.url, "a"), make_link(broker.url, "b")
    sender = ReliableSender(a, f"{topic}/up", window=4, ack_timeout=0.1, deadline=30)
    receiver = LossyReceiver(sender, loss=0.3)
    b.subscribe(f"{topic}/up", receiver)
    progress = []
    sender.on_progress = lambda s: progress.append(s.acked)
    items = [(str(i), b"%d:" % i + bytes(100)) for i in range(40)]
    stats = sender.send(items)
    assert receiver.unique == dict(items)  # exactly once after dedup
    assert len(receiver.seen) > 40 and stats.retransmits > 0  # acks were lost, resent
    assert stats.messages == stats.acked == 40
    assert receiver.max_unacked <= 4 and stats.max_outstanding == 4  # the window held
    assert progress[-1] == 40


@pytest.mark.mqtt
def test_reliable_sender_gives_up_after_its_deadline(broker, make_link, topic):
    a = make_link(broker.url, "a")
    sender = ReliableSender(a, f"{topic}/nobody", window=2, ack_timeout=0.1, deadline=0.8)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"2 messages to .* not acknowledged within 0.8s"):
        sender.send([("1", b"x"), ("2", b"y"), ("3", b"z")])
    assert 0.8 <= time.monotonic() - t0 < 2.0
    assert sender.stats.messages == 2  # the window was never opened for the third


@pytest.mark.mqtt
def test_reliable_sender_survives_a_broker_crash_mid_transfer(broker, make_link, topic):
    """Acks travel over MQTT too; kill -9 loses the broker's queue, retries recover."""
    fast = {"reconnect_min": 0.1, "reconnect_max": 0.3}
    dev, hub = make_link(broker.url, "dev", **fast), make_link(broker.url, "hub", **fast)
    sender = ReliableSender(dev, f"{topic}/up", window=4, ack_timeout=0.3, deadline=30)
    dev.subscribe(f"{topic}/ack", lambda t, p: sender.ack(p.decode()))
    got: dict[str, bytes] = {}

    def on_up(t: str, p: bytes) -> None:
        msg_id = p.split(b":")[0].decode()
        got.setdefault(msg_id, p)
        hub.publish(f"{topic}/ack", msg_id.encode(), wait=False)

    hub.subscribe(f"{topic}/up", on_up)
    items = [(str(i), b"%d:" % i + bytes(1000)) for i in range(60)]

    acked_at_crash = []

    def crash() -> None:
        wait_for(lambda: len(got) >= 20, 10)
        broker.broker.kill()
        acked_at_crash.append(sender.stats.acked)
        broker.broker.start()

    killer = threading.Thread(target=crash)
    killer.start()
    stats = sender.send(items)
    killer.join()
    assert acked_at_crash[0] < 60  # the crash did happen mid-transfer
    assert got == dict(items) and stats.acked == 60


# -- the PUBLISH decoder swapped into paho -----------------------------------------------------
def _publish_body(topic: bytes, qos: int, mid: int, props: Properties | None,
                  payload: bytes) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    return body + (props.pack() if props is not None else b"") + payload


def _decoded(result) -> tuple:
    return (*result[:5], str(result.properties), bytes(result.payload))


def _both(header: int, packet: bytes, proto) -> tuple:
    out = []
    for decode in (paho_patch._paho_decode_publish, paho_patch._decode_publish):
        try:
            out.append(_decoded(decode(header, bytearray(packet), proto)))
        except paho_patch._packet.MalformedPacket:
            out.append("malformed")
    return tuple(out)


@given(topic=st.binary(max_size=40), qos=st.integers(0, 2), mid=st.integers(1, 65535),
       flags=st.sampled_from([0, 1, 8, 9]), payload=st.binary(max_size=300),
       sub_ids=st.lists(st.integers(1, 268_435_455), max_size=3),
       user=st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=2),
       v5=st.booleans(), cut=st.integers(0, 400))
@settings(max_examples=300, deadline=None)
def test_fast_publish_decoder_matches_paho(topic, qos, mid, flags, payload, sub_ids, user, v5,
                                           cut):
    mqtt_packet = pytest.importorskip("paho.mqtt._packet", reason="paho < 2.2 keeps its own")
    props = None
    if v5:
        props = Properties(PacketTypes.PUBLISH)
        if sub_ids:
            props.SubscriptionIdentifier = sub_ids
        if user:
            props.UserProperty = user
    packet = _publish_body(topic, qos, mid, props, payload)
    proto = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    header = 0x30 | (qos << 1) | flags  # flags: dup and retain
    assert paho_patch.install() and mqtt_packet.decode_publish is paho_patch._decode_publish
    whole = _both(header, packet, proto)
    assert whole[0] == whole[1]
    paho, ours = _both(header, packet[:cut], proto)  # a prefix: lengths that lie
    assert ours in (paho, "malformed")  # paho reads past truncated properties; we refuse


def test_fast_publish_decoder_refuses_a_property_overrunning_its_length():
    pytest.importorskip("paho.mqtt._packet", reason="paho < 2.2 keeps its own")
    # properties length 1, but a subscription identifier needs 2 bytes
    packet = b"\x00\x01t" + b"\x01\x0b\x05" + b"payload"
    with pytest.raises(paho_patch._packet.MalformedPacket):
        paho_patch._decode_publish(0x30, packet, MQTTProtocolVersion.MQTTv5)


@pytest.mark.mqtt
def test_two_clients_with_one_client_id_are_named_as_the_cause(broker, make_link, caplog):
    """Mosquitto drops the older of two clients with one id, which reconnects and drops the
    other, forever: each link says so once it sees the pattern (same --device-id twice)."""
    caplog.set_level(logging.WARNING, logger="gkt.mqtt")
    a = make_link(broker.url, "twin", reconnect_min=0.1, reconnect_max=0.2)
    b = make_link(broker.url, "twin", reconnect_min=0.1, reconnect_max=0.2)
    assert wait_for(lambda: min(a.takeovers, b.takeovers) >= 5, 30)
    named = [r.getMessage() for r in caplog.records if "same client id" in r.getMessage()]
    assert len(named) == 2 and all("-twin'" in m and "own id" in m for m in named)
    b.close()  # the other one leaves: the survivor stays connected
    assert wait_for(lambda: a.connected, 10)
    drops = a.takeovers
    time.sleep(3)
    assert a.connected and a.takeovers == drops


def test_a_connection_lost_after_a_while_is_not_a_takeover():
    link = MqttLink(LinkConfig("mqtt://127.0.0.1:1", "solo"))
    link._connected_at = time.monotonic() - 60  # connected for a minute, then dropped
    link._on_disconnect(None, None, None, "Unspecified error", None)
    assert link.takeovers == 0
    link._connected_at = time.monotonic()
    for _ in range(3):
        link._on_disconnect(None, None, None, "Unspecified error", None)
    assert link.takeovers == 3
