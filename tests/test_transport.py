"""MqttLink and ReliableSender against a real Mosquitto."""

import random
import threading
import time

import pytest

from edge_runtime.transport import LinkConfig, MqttLink, ReliableSender, parse_url

pytestmark = pytest.mark.mqtt


def wait_for(pred, timeout=10.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def pair(broker, client_id):
    a = MqttLink(LinkConfig(broker.url, client_id + "-a"))
    b = MqttLink(LinkConfig(broker.url, client_id + "-b"))
    a.connect()
    b.connect()
    yield a, b
    a.close()
    b.close()


def test_parse_url():
    assert parse_url("mqtt://h:1999") == ("h", 1999, False)
    assert parse_url("mqtts://h") == ("h", 8883, True)
    with pytest.raises(ValueError, match="bad broker URL"):
        parse_url("http://h:1")


def test_publish_subscribe_round_trip(pair):
    a, b = pair
    got = []
    b.subscribe("t/x", lambda t, p: got.append((t, p)))
    assert wait_for(lambda: b.connected)
    time.sleep(0.2)
    a.publish("t/x", b"hello")
    assert wait_for(lambda: got == [("t/x", b"hello")])
    assert a.bytes_sent == 5 and b.bytes_received == 5


def test_oversized_payload_is_refused_locally(pair):
    a, _ = pair
    with pytest.raises(ValueError, match="exceeds the maximum packet size"):
        a.publish("t/x", b"x" * (a.cfg.max_packet_size + 1))


def test_unreachable_broker_is_a_clear_error():
    from server_hub.broker import free_port

    link = MqttLink(LinkConfig(f"mqtt://127.0.0.1:{free_port()}", "nobody"))
    with pytest.raises(ConnectionError, match="cannot reach MQTT broker at 127.0.0.1"):
        link.connect(timeout=2)


def test_reliable_sender_survives_lost_acks_and_respects_the_window(pair):
    a, b = pair
    sender = ReliableSender(a, "t/up", window=4, ack_timeout=0.2, deadline=30)
    received, rng = [], random.Random(0)

    def receiver(topic, payload):
        received.append(payload)
        if rng.random() < 0.3:
            return  # the ack is lost
        sender.ack(payload.decode())

    b.subscribe("t/up", receiver)
    time.sleep(0.2)
    stats = sender.send((str(i), str(i).encode()) for i in range(40))
    assert stats.max_outstanding <= 4
    assert stats.retransmits > 0
    assert {int(p) for p in received} == set(range(40))  # exactly once after dedup


def test_reliable_sender_gives_up_after_its_deadline(pair):
    a, _ = pair
    sender = ReliableSender(a, "t/nobody", window=2, ack_timeout=0.1, deadline=1.0)
    with pytest.raises(TimeoutError, match="not acknowledged"):
        sender.send([("1", b"x"), ("2", b"y")])


def test_link_reconnects_after_the_broker_is_killed(broker, client_id):
    a = MqttLink(LinkConfig(broker.url, client_id + "-a", reconnect_max=1.0))
    b = MqttLink(LinkConfig(broker.url, client_id + "-b", reconnect_max=1.0))
    a.connect()
    b.connect()
    got = []
    lock = threading.Lock()

    def on(t, p):
        with lock:
            got.append(p)

    b.subscribe("t/x", on)
    time.sleep(0.2)
    broker.broker.kill()  # kill -9: the in-memory queue is gone
    assert wait_for(lambda: not a.connected and not b.connected)
    broker.broker.start()
    assert wait_for(lambda: a.connected and b.connected, timeout=15)
    time.sleep(0.3)
    a.publish("t/x", b"after")
    assert wait_for(lambda: b"after" in got)
    a.close()
    b.close()
