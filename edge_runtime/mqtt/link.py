"""A thin wrapper over paho-mqtt (MQTT v5).

Facts this module encodes (each learned from a failure):
- TCP_NODELAY on the socket, or a QoS 1 round trip costs 40-90 ms instead of ~1 ms;
- paho does not enforce the broker's maximum packet size, and an oversized QoS 1 message
  loops forever in reconnects, so we refuse it here (the broker's limit, learned from
  its CONNACK, wins over ours when smaller);
- Mosquitto sends one copy of a message per matching subscription, so each subscription
  carries an MQTT v5 subscription identifier and a copy goes to that handler only;
- a broker restart can drop or duplicate messages, so delivery rests on application
  acks and retries (``edge_runtime.mqtt.reliable``) and on idempotent receivers;
- paho 2.x decodes each received PUBLISH ~3 ms per MB slower than it needs to;
  ``paho_patch.install()`` (called by every ``MqttLink``) swaps in a one-copy decoder;
- a second client with our client id (the same --device-id run twice) makes the broker
  drop us, we reconnect and drop it, and so on forever; Mosquitto 2.0 closes the socket
  without MQTT v5's "session taken over" reason, so we recognise the pattern instead.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_runtime.mqtt import paho_patch

Handler = Callable[[str, bytes], None]

# CONNACK reasons that retrying cannot fix: wrong or revoked credentials, a banned client.
AUTH_REFUSED = {0x86: "bad user name or password", 0x87: "not authorized", 0x8A: "banned",
                0x8C: "bad authentication method"}
DEFAULT_MAX_PACKET_SIZE = 512 * 1024  # the managed broker's default too
# A connection dropped this soon after it was made, this many times in a row, is another
# client taking our client id, not a bad network.
TAKEOVER_WINDOW_S = 2.0
TAKEOVER_COUNT = 5


@dataclass(frozen=True)
class LinkConfig:
    """Where and how an ``MqttLink`` connects (URL, login, TLS files, limits)."""

    url: str  # mqtt://host:port or mqtts://host:port
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # mqtts only; None = the system's CA store
    cert_file: str | None = None  # client certificate, if the broker asks for one
    key_file: str | None = None
    keepalive: int = 30
    # Seconds the broker keeps our session (subscriptions + queued QoS 1 messages) while
    # we are away; we always reconnect with clean_start=False. 0 = no persistent session.
    session_expiry: int = 3600
    # Largest whole packet, both ways: we refuse to publish bigger ones, and the broker
    # drops bigger ones on their way to us. Keep it equal to the broker's max_packet_size.
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    max_inflight: int = 32  # QoS 1 messages paho sends before waiting for a PUBACK
    reconnect_min: float = 0.5  # seconds; doubles per failed attempt up to reconnect_max
    reconnect_max: float = 15.0
    tcp_nodelay: bool = True  # off only to measure what it costs


class BrokerAddress(NamedTuple):
    host: str
    port: int
    tls: bool


def parse_url(url: str) -> BrokerAddress:
    """'mqtt://host:1883' -> (host, 1883, tls=False); the port defaults to 1883 / 8883."""
    hint = "use mqtt://HOST:PORT or mqtts://HOST:PORT"
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ValueError(f"bad broker URL {url!r}: {hint}")
    if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
        raise ValueError(f"bad broker URL {url!r}: no path, query or credentials; {hint}")
    try:
        port = u.port
    except ValueError:
        raise ValueError(f"bad port in broker URL {url!r}: {hint}") from None
    if port == 0:
        raise ValueError(f"bad port in broker URL {url!r}: {hint}")
    tls = u.scheme == "mqtts"
    return BrokerAddress(u.hostname, port or (8883 if tls else 1883), tls)


def _varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def publish_packet_size(topic: str, payload_len: int, qos: int = 1) -> int:
    """Bytes of the MQTT v5 PUBLISH packet (no properties), fixed header included."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + 1 + payload_len
    return 1 + _varint_len(remaining) + remaining


def _nodelay(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class AuthRefusedError(ConnectionError):
    """The broker refused our credentials (wrong, or the device was revoked)."""


class MqttLink:
    """One MQTT v5 connection with a persistent session and automatic reconnects.

    Handlers run on paho's network thread, one at a time: keep them short, and never
    call ``publish(wait=True)`` from one (the PUBACK would be read by that same thread;
    it raises RuntimeError instead of deadlocking).
    Counters (``bytes_sent`` ...) count payload bytes of every publish call and every
    message handed to a handler, retransmissions included.
    """

    def __init__(self, cfg: LinkConfig, logger: logging.Logger | None = None) -> None:
        paho_patch.install()
        self.cfg = cfg
        self.log = logger or logging.getLogger("gkt.mqtt")
        self.host, self.port, tls = parse_url(cfg.url)
        if (cfg.ca_file or cfg.cert_file) and not tls:
            raise ValueError(f"TLS files given but {cfg.url} is plain MQTT; use mqtts://")
        self.max_packet_size = cfg.max_packet_size  # lowered to the broker's, if smaller
        self.bytes_sent = self.bytes_received = self.msgs_sent = self.msgs_received = 0
        self._lock = threading.Lock()  # counters and subscriptions
        self._subs: dict[str, tuple[Handler, int]] = {}  # filter -> handler, qos
        self._resubs: set[int] = set()  # SUBSCRIBE mids sent by _on_connect
        self._unhandled: set[str] = set()  # topics we dropped a message on
        self._subacks: dict[int, list] = {}
        self._suback_cond = threading.Condition()
        self._pub_failures: dict[int, mqtt.ReasonCode] = {}
        self._connected = threading.Event()
        self._net_thread: threading.Thread | None = None  # paho's, where callbacks run
        self._disconnected = threading.Event()
        self._answered = threading.Event()  # first CONNACK (good or bad) of connect()
        self._ever_connected = False
        self._closing = False
        self._connected_at = 0.0
        self.takeovers = 0  # connections in a row the broker dropped within the window
        self._refused: str | None = None
        self._refused_auth = False
        # Called (network thread) when the broker refuses our credentials, e.g. on a
        # reconnect after `gkt-hub device revoke`: paho would otherwise retry forever.
        self.on_auth_refused: Callable[[str], None] | None = None
        # Called (network thread, after resubscribing) when a reconnect found our session
        # gone, e.g. the broker restarted without persistence: what it queued is lost.
        self.on_session_lost: Callable[[], None] | None = None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                        protocol=mqtt.MQTTv5)
        if cfg.tcp_nodelay:
            c.on_socket_open = _nodelay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.reconnect_delay_set(cfg.reconnect_min, cfg.reconnect_max)
        c.max_inflight_messages_set(cfg.max_inflight)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if tls:
            c.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
        self.client = c

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, timeout: float = 15.0) -> None:
        """Connect and start the network thread; ConnectionError if refused or silent.

        Subscribe before connecting to receive what the broker queued for this session
        (same client id) while we were away: it is delivered right after the CONNACK."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry
        props.MaximumPacketSize = self.cfg.max_packet_size
        where = f"{self.host}:{self.port}"
        self._answered.clear()
        self._refused = None
        self._closing = False
        self.client.connect_timeout = timeout
        try:
            self.client.connect(self.host, self.port, keepalive=self.cfg.keepalive,
                                clean_start=False, properties=props)
        except OSError as err:  # refused, unreachable, DNS, TLS handshake
            text = str(err)
            if "not yet valid" in text or "expired" in text:
                # a Raspberry Pi has no battery-backed clock: until NTP sets it, a valid
                # certificate looks issued in the future (or long expired)
                text += (f"; check this machine's date (it says "
                         f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)")
            raise ConnectionError(f"cannot reach MQTT broker at {where}: {text}") from None
        self.client.loop_start()
        if not self._answered.wait(timeout):
            self.close()
            raise ConnectionError(f"no CONNACK from MQTT broker at {where} within {timeout:g}s")
        if self._refused:
            self.close()
            err = AuthRefusedError if self._refused_auth else ConnectionError
            raise err(f"MQTT broker at {where} refused the connection: {self._refused}")

    def close(self) -> None:
        """Disconnect and stop the network thread. Messages published with wait=False
        and not yet acknowledged are dropped here (the broker keeps what it acked)."""
        self._closing = True
        if self.connected:
            self.client.disconnect()
            self._disconnected.wait(2.0)  # let the network thread send the DISCONNECT
        self.client.loop_stop()
        self._connected.clear()

    def __enter__(self) -> MqttLink:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe(self, topic: str, handler: Handler, qos: int = 1,
                  timeout: float = 10.0) -> None:
        """Call ``handler(topic, payload)`` for each message matching ``topic`` (a filter,
        ``$share/GROUP/...`` included). Kept across reconnects. When connected and called
        off the network thread, returns once the broker granted it (ConnectionError if it
        refused, TimeoutError if it did not answer)."""
        with self._lock:
            self._subs[topic] = (handler, qos)
        if not self.connected:
            return  # _on_connect subscribes
        mid = self._send_subscribe(topic, qos, retain_handling=0)
        if mid is None or self._on_network_thread():
            return  # not connected after all (_on_connect subscribes), or cannot wait here
        with self._suback_cond:
            if not self._suback_cond.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"no SUBACK for {topic} within {timeout:g}s")
            codes = self._subacks.pop(mid)
        if codes[0].is_failure:
            raise ConnectionError(f"broker refused the subscription to {topic}: {codes[0]}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                wait: bool = True, timeout: float = 30.0) -> mqtt.MQTTMessageInfo:
        """Publish; with ``wait`` return once the broker acknowledged (QoS >= 1).

        ValueError if the packet would exceed the maximum packet size (send smaller
        chunks); ConnectionError if paho or the broker refused it; TimeoutError if the
        broker did not acknowledge within ``timeout``. Without ``wait``, a message
        published while disconnected is sent on reconnect."""
        size = publish_packet_size(topic, len(payload), qos)
        if size > self.max_packet_size:
            raise ValueError(f"message of {len(payload)} bytes on {topic} exceeds the maximum "
                             f"packet size ({size} > {self.max_packet_size} bytes); "
                             "send smaller chunks")
        if wait and self._on_network_thread():
            raise RuntimeError("publish(wait=True) from a message handler would deadlock; "
                               "use wait=False there")
        if wait and not self._connected.wait(timeout):
            raise TimeoutError(f"not connected to {self.host}:{self.port} within {timeout:g}s")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        with self._lock:
            self.bytes_sent += len(payload)
            self.msgs_sent += 1
        if wait:
            if info.rc == mqtt.MQTT_ERR_NO_CONN:  # lost the connection just now
                raise ConnectionError(f"publish to {topic}: connection to {self.host}:"
                                      f"{self.port} lost; it will be sent on reconnect")
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise TimeoutError(f"publish to {topic} not acknowledged within {timeout:g}s")
            failure = self._pub_failures.pop(info.mid, None)
            if failure is not None:
                raise ConnectionError(f"broker refused the publish to {topic}: {failure}")
        return info

    # -- internals ------------------------------------------------------------------------
    def _on_network_thread(self) -> bool:
        return threading.current_thread() is self._net_thread

    def _send_subscribe(self, topic: str, qos: int, retain_handling: int) -> int | None:
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = subscription_id(topic)
        opts = SubscribeOptions(qos=qos, retainHandling=retain_handling)
        rc, mid = self.client.subscribe(topic, options=opts, properties=props)
        if rc == mqtt.MQTT_ERR_NO_CONN:
            return None
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"subscribe to {topic} failed: {mqtt.error_string(rc)}")
        return mid

    # -- paho callbacks (network thread) --------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._net_thread = threading.current_thread()
        if reason_code.is_failure:
            self._refused = f"{reason_code} (reason code {reason_code.value:#04x})"
            self._refused_auth = reason_code.value in AUTH_REFUSED
            self.log.error("MQTT broker %s:%d refused the connection: %s", self.host,
                           self.port, self._refused)
            self._answered.set()
            if self._refused_auth and self.on_auth_refused:
                self.on_auth_refused(self._refused)
            return
        limit = getattr(properties, "MaximumPacketSize", None)
        if limit and limit < self.max_packet_size:
            self.log.warning("broker %s:%d accepts packets up to %d bytes, less than our %d; "
                             "using its limit", self.host, self.port, limit,
                             self.max_packet_size)
            self.max_packet_size = limit
        # On a reconnect into our old session the broker still holds the subscriptions,
        # so don't have it replay retained messages; otherwise (first connect of this
        # process, or the session was lost) do, so we see the current state.
        resumed = self._ever_connected and flags.session_present
        if self._ever_connected and (flags.session_present or not self.cfg.session_expiry):
            self.log.log(logging.DEBUG if self.takeovers >= TAKEOVER_COUNT else logging.INFO,
                         "reconnected to %s:%d", self.host, self.port)
        elif self._ever_connected:
            self.log.warning("reconnected to %s:%d with a new session: what the broker had "
                             "queued for us is lost", self.host, self.port)
        with self._lock:
            subs = list(self._subs.items())
        for topic, (_, qos) in subs:
            mid = self._send_subscribe(topic, qos, 1 if resumed else 0)
            if mid is not None:
                self._resubs.add(mid)
        lost = self._ever_connected and not flags.session_present
        self._ever_connected = True
        self._connected_at = time.monotonic()
        self._disconnected.clear()
        self._connected.set()
        self._answered.set()
        if lost and self.on_session_lost:
            self.on_session_lost()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        self._disconnected.set()
        if self._closing:
            return
        short = time.monotonic() - self._connected_at < TAKEOVER_WINDOW_S
        self.takeovers = self.takeovers + 1 if short else 0
        if self.takeovers >= TAKEOVER_COUNT and (self.takeovers - TAKEOVER_COUNT) % 60 == 0:
            self.log.error("MQTT broker %s:%d dropped this connection right after it was "
                           "made %d times in a row: another client is connected with the "
                           "same client id %r, probably this --device-id running on another "
                           "process or machine; every device needs its own id. Retrying.",
                           self.host, self.port, self.takeovers, self.cfg.client_id)
        level = logging.DEBUG if self.takeovers > TAKEOVER_COUNT else logging.WARNING
        self.log.log(level, "lost the connection to MQTT broker %s:%d (%s); reconnecting",
                     self.host, self.port, reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid in self._resubs:
            self._resubs.discard(mid)
            for rc in reason_codes:
                if rc.is_failure:
                    self.log.error("broker refused a subscription on reconnect: %s", rc)
            return
        with self._suback_cond:
            self._subacks[mid] = reason_codes
            self._suback_cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Runs before paho marks the message published, so publish(wait=True) sees it.
        # A mid is reused only after its PUBACK, so the latest entry is the current one.
        if reason_code.is_failure:
            self._pub_failures[mid] = reason_code
            self.log.warning("broker refused a publish (mid %d): %s", mid, reason_code)
        else:
            self._pub_failures.pop(mid, None)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) or []
        with self._lock:
            self.bytes_received += len(msg.payload)
            self.msgs_received += 1
            # One copy per matching subscription, tagged with its id; a broker without
            # subscription identifiers sends one copy for all of them.
            handlers = [h for sub, (h, _) in self._subs.items()
                        if (not ids or subscription_id(sub) in ids)
                        and mqtt.topic_matches_sub(_unshared(sub), msg.topic)]
        if not handlers and msg.topic not in self._unhandled:  # once per topic
            self._unhandled.add(msg.topic)
            self.log.warning("dropped a message on %s: no handler yet (subscribe before "
                             "connect() to get what was queued for this session while away)",
                             msg.topic)
        for handler in handlers:
            try:
                handler(msg.topic, msg.payload)
            except Exception:  # a bug in one handler must not kill the network thread
                self.log.exception("handler for %s failed", msg.topic)


def subscription_id(topic_filter: str) -> int:
    """The MQTT v5 subscription identifier for a filter: derived from the filter alone, so
    messages queued under an earlier process's subscription reach the same handler."""
    return zlib.crc32(topic_filter.encode()) % 268_435_454 + 1


def _unshared(topic_filter: str) -> str:
    """'$share/GROUP/a/b' -> 'a/b' (what the filter matches)."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter
