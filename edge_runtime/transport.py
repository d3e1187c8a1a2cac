"""A thin wrapper over paho-mqtt (MQTT v5), plus acknowledged, windowed sending.

Facts this module encodes (each learned from a failure, see DESIGN.md):
- TCP_NODELAY on the socket, or a QoS 1 round trip costs 40-90 ms instead of ~1 ms;
- paho does not enforce the broker's maximum packet size, and an oversized QoS 1 message
  loops forever in reconnects, so we refuse it here;
- a broker restart can drop or duplicate messages, so delivery rests on application
  acks and retries (``ReliableSender``) and on idempotent receivers.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

Handler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class LinkConfig:
    url: str  # mqtt://host:port or mqtts://host:port
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    session_expiry: int = 3600  # seconds the broker keeps our session and QoS 1 queue
    max_packet_size: int = 512 * 1024
    max_inflight: int = 32
    reconnect_min: float = 0.5
    reconnect_max: float = 15.0


def parse_url(url: str) -> tuple[str, int, bool]:
    """'mqtt://host:1883' -> (host, 1883, tls=False); mqtts defaults to 8883."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ValueError(f"bad broker URL {url!r}: use mqtt://HOST:PORT or mqtts://HOST:PORT")
    try:
        port = u.port or (8883 if u.scheme == "mqtts" else 1883)
    except ValueError:
        raise ValueError(f"bad port in broker URL {url!r}") from None
    return u.hostname, port, u.scheme == "mqtts"


def _nodelay(client, userdata, sock) -> None:
    s = getattr(sock, "_sock", sock)  # unwrap an SSL socket if needed
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket (e.g. a websocket proxy): nothing to tune


class MqttLink:
    """One MQTT v5 connection with a persistent session and automatic reconnects.

    Handlers run on paho's network thread: keep them short, never block on a publish
    with ``wait=True`` from inside one.
    """

    def __init__(self, cfg: LinkConfig, logger: logging.Logger | None = None,
                 nodelay: bool = True) -> None:
        self.cfg = cfg
        self.log = logger or logging.getLogger("gkt.mqtt")
        self.host, self.port, tls = parse_url(cfg.url)
        self.bytes_sent = self.bytes_received = self.msgs_sent = self.msgs_received = 0
        self._subs: dict[str, tuple[Handler, int]] = {}
        self._connected = threading.Event()
        self._first = threading.Event()
        self._connect_error: str | None = None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                        protocol=mqtt.MQTTv5)
        if nodelay:
            c.on_socket_open = _nodelay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.reconnect_delay_set(cfg.reconnect_min, cfg.reconnect_max)
        c.max_inflight_messages_set(cfg.max_inflight)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if tls or cfg.ca_file:
            c.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
        self.client = c

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout: float = 15.0) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry
        props.MaximumPacketSize = self.cfg.max_packet_size
        where = f"{self.host}:{self.port}"
        try:
            self.client.connect(self.host, self.port, keepalive=self.cfg.keepalive,
                                clean_start=False, properties=props)
        except OSError as err:
            raise ConnectionError(f"cannot reach MQTT broker at {where}: {err}") from None
        self.client.loop_start()
        if not self._first.wait(timeout):
            self.close()
            raise ConnectionError(f"no answer from MQTT broker at {where} within {timeout:.0f}s")
        if self._connect_error:
            self.close()
            raise ConnectionError(f"MQTT broker at {where} refused us: {self._connect_error}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        self._subs[topic] = (handler, qos)
        if self.connected:
            self.client.subscribe(topic, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                wait: bool = True, timeout: float = 30.0) -> mqtt.MQTTMessageInfo:
        size = len(payload) + len(topic.encode()) + 32  # fixed header, lengths, properties
        if size > self.cfg.max_packet_size:
            raise ValueError(f"message of {len(payload)} bytes on {topic} exceeds the maximum "
                             f"packet size {self.cfg.max_packet_size}; send smaller chunks")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self.bytes_sent += len(payload)
        self.msgs_sent += 1
        if wait:
            deadline = time.monotonic() + timeout
            while not info.is_published():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"publish to {topic} not acknowledged within {timeout}s")
                info.wait_for_publish(timeout=0.2)
        return info

    # -- paho callbacks (network thread) --------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            self.log.error("broker %s:%d refused the connection: %s", self.host, self.port,
                           reason_code)
            self._first.set()
            return
        for topic, (_, qos) in self._subs.items():
            client.subscribe(topic, qos)
        if self._first.is_set():
            self.log.info("reconnected to %s:%d (session present: %s)", self.host, self.port,
                          flags.session_present)
        self._connected.set()
        self._first.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code != 0:
            self.log.warning("lost the broker %s:%d (%s); reconnecting", self.host, self.port,
                             reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        self.bytes_received += len(msg.payload)
        self.msgs_received += 1
        for sub, (handler, _) in self._subs.items():
            if mqtt.topic_matches_sub(sub, msg.topic):
                try:
                    handler(msg.topic, msg.payload)
                except Exception:  # a bug in one handler must not kill the network thread
                    self.log.exception("handler for %s failed", msg.topic)


@dataclass
class SendStats:
    messages: int = 0
    bytes: int = 0
    retransmits: int = 0
    max_outstanding: int = 0


class ReliableSender:
    """Send (msg_id, payload) pairs with at most ``window`` unacknowledged, resending any
    not acknowledged within ``ack_timeout`` (doubling up to 8x); give up after ``deadline``.

    The owner parses acknowledgements and calls ``ack(msg_id)`` (from any thread).
    """

    def __init__(self, link: MqttLink, topic: str, window: int = 8, ack_timeout: float = 5.0,
                 deadline: float = 600.0,
                 on_progress: Callable[[SendStats], None] | None = None) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.link, self.topic = link, topic
        self.window, self.ack_timeout, self.deadline = window, ack_timeout, deadline
        self.on_progress = on_progress
        self.stats = SendStats()
        self._pending: dict[str, list] = {}  # msg_id -> [payload, sent_at, tries]
        self._cond = threading.Condition()

    def ack(self, msg_id: str) -> None:
        with self._cond:
            if self._pending.pop(msg_id, None) is not None:
                self._cond.notify_all()

    def send(self, items: Iterable[tuple[str, bytes]]) -> SendStats:
        it = iter(items)
        exhausted = False
        t_end = time.monotonic() + self.deadline
        with self._cond:
            while True:
                while not exhausted and len(self._pending) < self.window:
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    msg_id, payload = nxt
                    self._pending[msg_id] = [payload, time.monotonic(), 1]
                    self.link.publish(self.topic, payload, wait=False)
                    self.stats.messages += 1
                    self.stats.bytes += len(payload)
                    self.stats.max_outstanding = max(self.stats.max_outstanding,
                                                     len(self._pending))
                    if self.on_progress:
                        self.on_progress(self.stats)
                if exhausted and not self._pending:
                    return self.stats
                now = time.monotonic()
                if now > t_end:
                    raise TimeoutError(f"{len(self._pending)} messages to {self.topic} not "
                                       f"acknowledged within {self.deadline:.0f}s")
                for entry in self._pending.values():
                    payload, sent_at, tries = entry
                    if now - sent_at > self.ack_timeout * min(2 ** (tries - 1), 8):
                        if self.link.connected:
                            self.link.publish(self.topic, payload, wait=False)
                            self.stats.retransmits += 1
                        entry[1], entry[2] = now, tries + 1
                self._cond.wait(timeout=min(0.2, self.ack_timeout))
