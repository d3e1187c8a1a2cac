"""The hub's upload intake: what the paho network thread does with every device message.

Decode, validate (size, header, spoofing, schema, known device, round), store into the
hub's feature bank, journal (so a crashed hub replays what it accepted) and acknowledge.
Anything that does not validate is logged, counted by reason and dropped; nothing here
trains or touches the server model. The synchronous round loop (rounds.py), hub workers
and async mode all receive through one ``UploadIntake``; async mode swaps in its own rule
for upload messages (``accept``), since it has no rounds.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from edge_runtime.mqtt.link import MqttLink
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.limits import max_packet_size, rows_per_message
from edge_runtime.protocol.messages import logits_messages, parse_extractor, parse_feature_chunk
from server_hub.feature_bank import DeviceFeatures
from server_hub.hub import Hub
from server_hub.journal import UploadJournal
from server_hub.uplink.held import Resync

log = logging.getLogger("gkt.hub")
UPLOAD_KINDS = ("features", "extractor", "upload_done")


@dataclass
class Upload:
    """One device's upload for the current round (async: its open upload)."""

    upload_id: str = ""
    chunks: set[int] = field(default_factory=set)
    expected: int | None = None
    extractor: bool = False
    done: bool = False
    bytes: int = 0
    edge_accuracy: float | None = None
    epoch: str | None = None  # the feature epoch the device names this upload's maps

    @property
    def complete(self) -> bool:
        return self.done and self.extractor and self.expected == len(self.chunks)


@dataclass(frozen=True)
class HubStatus:
    """What monitoring reads of a running service (``status()`` of any service kind)."""

    mode: str  # sync | async
    round: int  # sync: the round; async: evaluations so far
    rounds: int
    phase: str
    round_deadline: float
    known: dict[str, dict]  # device -> its hello
    uploads: dict[str, bool]  # device -> its open upload is complete
    rejected: dict[str, int]
    bytes_received: int
    bytes_sent: int
    version: int | None = None  # async: the hub version
    steps: int | None = None
    max_updates: int | None = None
    slots: dict | None = None  # async: AsyncHub.summary()


class IntakeControls:
    """What every service (sync, async, hub worker) offers besides ``run`` and ``status``;
    they all receive through ``self.intake``."""

    intake: UploadIntake

    def stop(self) -> None:
        """End the run after the current step (SIGTERM); a restart resumes."""
        self.intake.stop()

    def wait_stopped(self, timeout: float) -> bool:
        """Whether ``stop`` was called within ``timeout`` seconds."""
        return self.intake.stopped.wait(timeout)

    def add_observer(self, observer) -> None:
        """``observer.on_accepted(device, msg, size, merged)`` after each accepted message."""
        self.intake.observers.append(observer)


class NoDevicesError(RuntimeError):
    """Too few devices joined or uploaded before a deadline (or the hub was stopped)."""


class UploadIntake:
    """Receives, validates, stores, journals and acknowledges device messages.

    Shared state (known devices, the open uploads, the round and phase) is guarded by
    ``cond``; the main thread waits on it for uploads.
    """

    def __init__(self, link: MqttLink, hub: Hub, journal: UploadJournal, max_payload: int,
                 rounds: bool = True) -> None:
        self.link = link
        self.hub = hub
        self.journal = journal
        self.max_payload = max_payload
        self.rounds = rounds  # sync: a logits request for a future round is an error
        self.known: dict[str, dict] = {}  # device -> its hello
        self.uploads: dict[str, Upload] = {}
        self.rejected: Counter[str] = Counter()
        self.round = -1
        self.phase = "idle"
        self.sent: dict[str, tuple[int, list[bytes]]] = {}  # newest logits, for re-requests
        self.bytes_down = 0
        self.cond = threading.Condition()
        self.stopped = threading.Event()
        self.listening = threading.Event()  # set once uploads are subscribed to
        self.observers: list = []  # on_accepted(device, msg, size, merged)
        # How upload messages are taken: the round rule here, async mode its own.
        self.accept: Callable[[str, wire.Message, bytes, bool], None] = self.accept_round_upload
        self.on_hello: Callable[[str, wire.Message], None] | None = None
        self.merged_update: Callable[[str], int | None] = lambda device: None

    def listen(self, topic_filter: str = topics.UP_WILDCARD) -> None:
        self.link.subscribe(topic_filter, self.on_up)
        self.listening.set()

    def stop(self) -> None:
        self.stopped.set()
        with self.cond:
            self.cond.notify_all()

    # -- network thread ------------------------------------------------------------------
    def on_up(self, topic: str, payload: bytes, replay: bool = False) -> None:
        if not payload:  # a device clearing its retained hello
            return
        try:
            device = topics.device_from_topic(topic)
            msg = wire.decode_message(payload, max_bytes=max_packet_size(self.max_payload))
            if msg.device != device:
                raise wire.WireError("spoofed", f"header names device {msg.device!r} "
                                                f"on {device!r}'s topic")
            self._handle(device, msg, payload, replay)
            for observer in self.observers:
                observer.on_accepted(device, msg, len(payload), self.merged_update(device))
        except (wire.WireError, ValueError) as err:
            reason = getattr(err, "reason", "invalid")
            self.rejected[reason] += 1
            log.warning("rejected message on %s (%s): %s", topic, reason, err)

    def _handle(self, device: str, msg: wire.Message, msg_bytes: bytes, replay: bool) -> None:
        if msg.kind == "hello":
            ncls = msg.meta.get("num_classes")
            if ncls != self.hub.num_classes:
                raise wire.WireError("schema", f"device {device} has {ncls} classes, "
                                               f"the hub {self.hub.num_classes}")
            with self.cond:
                first = device not in self.known
                self.known[device] = dict(msg.meta)
                self.cond.notify_all()
            if first:
                log.info("device %s joined (%s samples, codec %s)", device,
                         msg.meta.get("num_samples"), msg.meta.get("codec"))
            if self.on_hello:
                self.on_hello(device, msg)
        elif msg.kind == "logits_request":
            self._resend_logits(device, msg.round)
        elif msg.kind in UPLOAD_KINDS:
            self.accept(device, msg, msg_bytes, replay)
        else:
            raise wire.WireError("unexpected", f"kind {msg.kind!r} is not sent to the hub")

    def accept_round_upload(self, device: str, msg: wire.Message, msg_bytes: bytes,
                            replay: bool) -> None:
        """Synchronous rule: uploads count for the open round while it collects."""
        with self.cond:
            self.require_known(device, msg.kind, replay)
            if msg.round != self.round or self.phase != "collect":
                if msg.round > self.round:
                    raise wire.WireError("future_round", f"round {msg.round} not open yet "
                                                         f"(hub is in round {self.round})")
                # Stale: acknowledge so the device stops resending, but use nothing.
                self.rejected["stale_round"] += 1
                self.ack(device, msg.msg_id)
                return
            try:
                stored = self.store(device, msg, len(msg_bytes), replay)
            except Resync as err:  # the device must send full maps (docs/uplink.md)
                self.rejected["resync"] += 1
                log.info("%s", err)
                if not replay:
                    self.ack(device, msg.msg_id, resync=True)
                return
            self.cond.notify_all()
        if replay:
            return
        ack = lambda: self.ack(device, msg.msg_id)  # noqa: E731
        if stored:  # acked once the journal's group commit made it durable
            self.journal.record(self.round, device, msg_bytes, then=ack)
        else:  # a duplicate: its first copy may still be waiting for that commit
            self.journal.after_commit(ack)

    def require_known(self, device: str, kind: str, replay: bool) -> None:
        if replay:  # it was accepted before the crash, so the device was known
            self.known.setdefault(device, {})
        if device not in self.known:
            raise wire.WireError("unknown_device", f"{device} sent {kind} before hello")

    def store(self, device: str, msg: wire.Message, size: int, replay: bool) -> bool:
        """Apply an upload message; False if it was a duplicate (nothing new to journal)."""
        upload_id = msg.msg_id.split(":", 1)[0]
        up = self.uploads.get(device)
        if up is None or up.upload_id != upload_id:
            if up is not None:  # the device restarted its upload: drop the partial one
                log.info("device %s restarted its round %d upload", device, self.round)
                if not replay:
                    self.journal.drop_device(self.round, device)
            self.hub.bank.clear(device)
            up = self.uploads[device] = Upload(upload_id)
        if msg.kind == "features":
            if up.expected is None:
                up.expected = msg.chunks
            if msg.chunks != up.expected:
                raise wire.WireError("schema", f"chunk count changed within upload {upload_id}")
            if msg.chunk in up.chunks:
                return False  # a duplicate: already stored, just ack again
            b = parse_feature_chunk(msg)
            maps = self.hub.held.reconstruct(device, b)
            self.hub.receive_features(device, DeviceFeatures(b.ids, maps, b.logits, b.labels))
            up.chunks.add(msg.chunk)
        elif msg.kind == "extractor":
            self.hub.receive_extractor(device, parse_extractor(msg))
            up.extractor = True
        else:
            n = int(msg.meta.get("num_chunks", -1))
            if up.expected is not None and n != up.expected:
                raise wire.WireError("schema", f"upload_done says {n} chunks, chunks say "
                                               f"{up.expected}")
            up.expected = n
            up.done = True
            acc = msg.meta.get("edge_accuracy")
            up.edge_accuracy = float(acc) if isinstance(acc, (int, float)) else None
            up.epoch = msg.meta.get("epoch")
        up.bytes += size
        return True

    def ack(self, device: str, msg_id: str, resync: bool = False) -> None:
        meta = {"msg_ids": [msg_id], **({"resync": True} if resync else {})}
        payload = wire.encode_message("ack", device, max(self.round, 0), {},
                                      msg_id=f"ack-{uuid.uuid4().hex[:8]}", meta=meta)
        self.bytes_down += len(payload)
        self.link.publish(topics.down(device), payload, wait=False)

    def _resend_logits(self, device: str, rnd: int) -> None:
        if self.rounds and rnd > self.round:
            raise wire.WireError("future_round", f"{device} asked for round {rnd} logits; the "
                                                 f"hub is in round {self.round}")
        sent_round, msgs = self.sent.get(device, (-1, []))
        if sent_round != rnd or not msgs:  # not trained yet (they will come), or too old
            log.debug("%s asked for round %d logits; none to send yet", device, rnd)
            return
        log.info("resending %d logits chunks to %s", len(msgs), device)
        for m in msgs:
            self.link.publish(topics.down(device), m, wait=False)

    # -- main thread ---------------------------------------------------------------------
    def send_logits(self, device: str, rnd: int, ids, logits, wait: bool = True,
                    feature_epoch: str | None = None) -> None:
        """Send a device its server logits (kept for a re-request), naming the feature
        epoch the hub holds its maps under (None: it holds none; send full maps)."""
        per_chunk = rows_per_message(self.max_payload, 8 + 4 * self.hub.num_classes)
        msgs = logits_messages(device, rnd, ids, logits, per_chunk,
                               feature_epoch=feature_epoch)
        self.sent[device] = (rnd, msgs)
        for m in msgs:
            self.link.publish(topics.down(device), m, wait=wait)
            self.bytes_down += len(m)

    def replay(self, rnd: int) -> None:
        """Re-apply what round ``rnd`` accepted before a crash (validated again)."""
        n = 0
        for device, payload in self.journal.replay(rnd):
            self.on_up(topics.up(device), payload, replay=True)
            n += 1
        if n:
            done = sum(u.complete for u in self.uploads.values())
            log.info("round %d: replayed %d accepted messages from disk (%d devices complete)",
                     rnd, n, done)

    def open_round(self, rnd: int) -> None:
        """Start taking round ``rnd``'s uploads (after replaying its journal)."""
        with self.cond:
            self.round, self.phase = rnd, "collect"
            self.uploads = {}
            self.hub.start_round()
        self.replay(rnd)

    def view(self) -> tuple[dict[str, Upload], int, bool]:
        """(complete uploads by device, bytes in, stop asked); call under ``cond``."""
        done = {d: u for d, u in sorted(self.uploads.items()) if u.complete}
        return done, sum(u.bytes for u in self.uploads.values()), self.stopped.is_set()

    def wait_for_devices(self, min_devices: int, timeout: float,
                         on_status: Callable[[str], None]) -> None:
        t_end = time.monotonic() + timeout
        with self.cond:
            while len(self.known) < min_devices and not self.stopped.is_set():
                left = t_end - time.monotonic()
                if left <= 0:
                    raise NoDevicesError(f"only {len(self.known)} of {min_devices} devices "
                                         f"joined within {timeout:.0f}s")
                on_status(f"waiting for devices: {len(self.known)}/{min_devices}")
                self.cond.wait(timeout=min(left, 1.0))

    def status(self, mode: str, rounds: int, round_deadline: float, **extra) -> HubStatus:
        # dict() copies are single C calls, safe while the network thread inserts
        uploads = {d: u.complete for d, u in list(self.uploads.items())}
        return HubStatus(mode, self.round, rounds, self.phase, round_deadline,
                         dict(self.known), uploads, dict(self.rejected),
                         self.link.bytes_received, self.link.bytes_sent, **extra)
