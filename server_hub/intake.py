"""The hub's upload intake: what the paho network thread does with every device message.

Decode, validate (size, header, spoofing, schema, known device, round), store into the
hub's feature bank, journal (so a crashed hub replays what it accepted) and acknowledge.
Anything that does not validate is logged, counted by reason and dropped; nothing here
trains or touches the server model. The round loop, hub workers and async mode (which
swaps in its own rule for upload messages, ``accept``) all receive through one intake.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

from edge_runtime.mqtt.link import MqttLink
from edge_runtime.protocol import refusal, topics, wire
from edge_runtime.protocol.codecs import LOGITS_CODEC
from edge_runtime.protocol.limits import max_packet_size, rows_per_message
from edge_runtime.protocol.messages import logits_messages, parse_extractor, parse_feature_chunk
from edge_runtime.protocol.run_spec import RunSpec
from server_hub import admission
from server_hub.admission import AdmissionLimits, Refusal, UploadTotals
from server_hub.disk import DiskRoom
from server_hub.hub import Hub
from server_hub.hub_status import HubStatus
from server_hub.journal import UploadJournal
from server_hub.registry import DeviceRegistry
from server_hub.uplink.held import Resync

log = logging.getLogger("gkt.hub")
UPLOAD_KINDS = ("features", "extractor", "upload_done")
MODEL_KINDS = ("model_request", "model_ack")  # what devices send on their model topic
MODEL_REPLY_BYTES = 16 * 1024  # a model_ack or model_request is a header, no tensors


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
    claimed: int = -1  # samples upload_done says it holds
    totals: UploadTotals = field(default_factory=lambda: UploadTotals(set()))

    @property
    def rows(self) -> int:
        """Distinct samples stored (what counters count, not what the device claims)."""
        return len(self.totals.ids)

    @property
    def complete(self) -> bool:
        return self.done and self.extractor and self.expected == len(self.chunks)


class NoDevicesError(RuntimeError):
    """Too few devices joined or uploaded before a deadline (or the hub was stopped)."""


class UploadIntake:
    """Receives, validates, stores, journals and acknowledges device messages.

    Shared state (known devices, the open uploads, the round and phase) is guarded by
    ``cond``; the main thread waits on it for uploads.
    """

    def __init__(self, link: MqttLink, hub: Hub, journal: UploadJournal, max_payload: int,
                 registry: DeviceRegistry, limits: AdmissionLimits | None = None,
                 size: int | None = None, rounds: bool = True,
                 run_spec: RunSpec | None = None) -> None:
        self.link = link
        self.run_spec = run_spec  # announced; a hello naming another run is refused
        self.class_report: dict | None = None  # set by the loop after each evaluation
        self.hub = hub
        self.journal = journal
        self.max_payload = max_payload
        self.rounds = rounds  # sync: a logits request for a future round is an error
        self.registry, self.limits = registry, limits or AdmissionLimits()
        self.size = size if isinstance(size, int) and size > 0 else None  # the hub's input S
        self.known: dict[str, dict] = {d: registry.hello_meta(d)  # device -> its hello
                                       for d in registry.devices}
        self.quarantined: Counter[str] = Counter()
        self.dropped: set[str] = set()  # devices whose upload this round was dropped
        self.replies = admission.ReplyLimiter()
        self.uploads: dict[str, Upload] = {}
        self.rejected: Counter[str] = Counter()
        self.round = -1
        self.phase = "idle"
        self.sent: dict[str, tuple[int, list[bytes]]] = {}  # newest logits, for re-requests
        self.bytes_down = 0
        self.cond = threading.Condition()
        self.stopped = threading.Event()
        self.listening = threading.Event()  # set once uploads are subscribed to
        self.observers: list = []  # on_accepted(device, msg, size, merged, completed)
        # How upload messages are taken: the round rule here, async mode its own.
        self.accept: Callable[[str, wire.Message, bytes, bool], None] = self.accept_round_upload
        self.on_hello: Callable[[str, wire.Message], None] | None = None
        self.disk: DiskRoom | None = None  # warns when the fleet's maps outgrow the disk
        self.merged_update: Callable[[str], int | None] = lambda device: None
        self.delivery = None  # a delivery.models.ModelDelivery: devices get their models
        # (upload id, samples) of the upload a device's message completed, for observers
        self.completed: Callable[[str], tuple[str, int] | None] = self.round_completed

    def listen(self, topic_filter: str = topics.UP_WILDCARD) -> None:
        self.link.subscribe(topic_filter, self.on_up)
        self.listening.set()

    def attach_delivery(self, delivery) -> None:
        """Deliver models through ``delivery`` (a delivery.models.ModelDelivery) and take
        the devices' ``model_ack`` / ``model_request`` on their model topics. Only the hub
        that delivers calls this (one hub; rank 0 of hub workers): the subscription is not
        shared, so every device's replies reach it whichever worker took its uploads."""
        self.delivery = delivery
        delivery.payload_for = self.payload_for
        self.link.subscribe(topics.MODEL_WILDCARD, self.on_model)

    def stop(self) -> None:
        self.stopped.set()
        with self.cond:
            self.cond.notify_all()

    # -- network thread ------------------------------------------------------------------
    def on_up(self, topic: str, payload: bytes, replay: bool = False) -> None:
        if not payload:  # a device clearing its retained hello
            return
        msg = None
        try:
            device, msg = self._decode(topic, "up", payload, max_packet_size(self.max_payload))
            self._handle(device, msg, payload, replay)
            self._observe(device, msg, payload)
        except (wire.WireError, ValueError) as err:
            reason = getattr(err, "reason", "invalid")
            if replay:
                self.rejected[reason] += 1
                self.quarantined[f"replay_{reason}"] += 1
                self.dropped.add(topic.split("/")[-2])
                log.warning("quarantined a replayed message on %s (%s): %s", topic, reason, err)
            else:
                self._reject(topic, msg, err)
        except Exception as err:  # noqa: BLE001 (a replayed message must never crash-loop)
            if not replay:
                raise
            self.quarantined["replay_failed"] += 1
            self.dropped.add(topic.split("/")[-2])
            log.exception("quarantined a replayed message on %s: %s", topic, err)

    def on_model(self, topic: str, payload: bytes) -> None:
        """A device's ``model_ack`` or ``model_request`` on its model topic: the same checks
        as ``on_up`` (the topic names the device, the header must name the same one), then
        to the delivery. Anything else is logged, counted and refused; never raised."""
        if not payload:
            return
        msg = None
        try:
            device, msg = self._decode(topic, "model", payload, MODEL_REPLY_BYTES)
            if msg.kind not in MODEL_KINDS:
                raise wire.WireError("unexpected", f"kind {msg.kind!r} is not sent on a model "
                                                   "topic")
            if self.delivery is not None:
                self.delivery.on_message(device, msg)
            self._observe(device, msg, payload)
        except (wire.WireError, ValueError) as err:
            self._reject(topic, msg, err)
        except Exception:  # noqa: BLE001 (the network thread must keep serving the run)
            self.rejected["failed"] += 1
            log.exception("a model message on %s failed", topic[:200])

    @staticmethod
    def _decode(topic: str, leaf: str, payload: bytes, max_bytes: int
                ) -> tuple[str, wire.Message]:
        """(device, message) of a device -> hub message whose header names the device its
        topic names; WireError otherwise."""
        device = topics.device_from_topic(topic, leaf)
        msg = wire.decode_message(payload, max_bytes=max_bytes)
        if msg.device != device:
            raise wire.WireError("spoofed", f"header names device {msg.device!r} "
                                            f"on {device!r}'s topic")
        return device, msg

    def _observe(self, device: str, msg: wire.Message, payload: bytes) -> None:
        for observer in self.observers:  # monitoring counts every accepted device message
            observer.on_accepted(device, msg, len(payload), self.merged_update(device),
                                 self.completed(device))

    def _reject(self, topic: str, msg: wire.Message | None, err: Exception) -> None:
        """Count, log and answer a message refused on ``topic``."""
        reason = getattr(err, "reason", "invalid")
        self.rejected[reason] += 1
        log.warning("rejected message on %s (%s): %s", topic[:200], reason, err)
        self.refuse(topic, msg.msg_id if msg else "", reason, str(err))

    def refuse(self, topic: str, msg_id: str, reason: str, detail: str) -> None:
        """Tell the device why (errors as data), a few times per period at most."""
        try:
            leaf = "model" if isinstance(topic, str) and topic.endswith("/model") else "up"
            device = topics.device_from_topic(topic, leaf)
        except wire.WireError:
            return
        if not self.replies.allow(device, reason, time.monotonic()) or not self.link.connected:
            return
        self.link.publish(topics.down(device), refusal.reject_message(
            device, self.round, refusal.device_reason(reason), detail, msg_id), wait=False)

    def round_completed(self, device: str) -> tuple[str, int] | None:
        up = self.uploads.get(device)
        return (up.upload_id, up.rows) if up is not None and up.complete else None

    def _handle(self, device: str, msg: wire.Message, msg_bytes: bytes, replay: bool) -> None:
        if msg.kind == "hello":
            admission.check_run_id(self.run_spec, device, msg.meta)
            limits = self.limits
            admission.check_hello(msg.meta, self.hub.num_classes, self.feature_size(), limits)
            with self.cond:
                if device not in self.registry and len(self.registry) >= limits.max_devices:
                    if msg.meta:  # clear the retained hello it left on the broker
                        self.link.publish(topics.up(device), b"", retain=True, wait=False)
                    raise Refusal(refusal.TOO_MANY_DEVICES, f"the hub has "
                                  f"{limits.max_devices} devices registered")
                first = self.registry.hello(device, dict(msg.meta), self.round)
                self.known[device] = dict(msg.meta)
                self.cond.notify_all()
            if first:
                log.info("device %s joined (%s samples, codec %s)", device,
                         msg.meta.get("num_samples"), msg.meta.get("codec"))
                if self.disk is not None:
                    self.disk.check(sum(int(m.get("num_samples") or 0)
                                        for m in self.known.values()), self.feature_size())
            if self.on_hello:
                self.on_hello(device, msg)
        elif msg.kind == "logits_request":
            self._resend_logits(device, msg.round)
        elif msg.kind in MODEL_KINDS:  # devices older than the model topic send them here
            if self.delivery is not None:
                self.delivery.on_message(device, msg)
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
                    raise wire.WireError(refusal.FUTURE_ROUND, f"round {msg.round} not open "
                                         f"yet (hub is in round {self.round})")
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
        if replay and device in self.registry:  # it was known when its message was accepted
            self.known.setdefault(device, self.registry.hello_meta(device))
        if device not in self.known:
            raise wire.WireError(refusal.UNKNOWN_DEVICE, f"{device} sent {kind} before hello")

    def feature_size(self) -> int | None:
        """The run's S: the hub's input size, else the first size the fleet uploaded."""
        return self.size or self.registry.feature_size

    def drop_upload(self, device: str, replay: bool) -> None:
        """Drop the device's upload for this round; the round no longer waits for it."""
        self.dropped.add(device)
        self.uploads.pop(device, None)
        self.hub.bank.clear(device)
        if not replay:
            self.journal.drop_device(self.round, device)

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
        hello_samples = int(self.known.get(device, {}).get("num_samples", 0))
        if msg.kind == "features":
            if up.expected is None:
                up.expected = msg.chunks
            if msg.chunks != up.expected:
                raise wire.WireError("schema", f"chunk count changed within upload {upload_id}")
            if msg.chunk in up.chunks:
                return False  # a duplicate: already stored, just ack again
            fsize = admission.check_features(msg, self.feature_size(), up.totals,
                                            hello_samples, self.limits)
            b = parse_feature_chunk(msg)
            self.hub.receive_chunk(device, b)
            self.registry.settle_feature_size(fsize)
            up.totals.ids.update(b.ids.tolist())
            up.totals.wire_bytes += admission.msg_wire_bytes(msg)
            up.totals.feature_bytes += b.features.numel() * 4
            up.chunks.add(msg.chunk)
        elif msg.kind == "extractor":
            self.hub.receive_extractor(device, parse_extractor(msg))
            up.extractor = True
        else:
            n = int(msg.meta.get("num_chunks", -1))
            admission.check_chunk_count(n, hello_samples)
            if up.expected is not None and n != up.expected:
                raise wire.WireError("schema", f"upload_done says {n} chunks, chunks say "
                                               f"{up.expected}")
            up.claimed = int(msg.meta["num_samples"])
            if up.claimed > hello_samples:
                self.drop_upload(device, replay)
                raise Refusal(refusal.COUNT_MISMATCH, f"upload_done claims {up.claimed} "
                                                      f"samples; the hello said {hello_samples}")
            up.expected = n
            up.done = True
            acc = msg.meta.get("edge_accuracy")
            up.edge_accuracy = float(acc) if isinstance(acc, (int, float)) else None
            up.epoch = msg.meta.get("epoch")
        up.bytes += size
        if up.complete:
            try:
                admission.check_done(up.claimed, up.rows)
            except Refusal:
                self.drop_upload(device, replay)
                raise
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

    def payload_for(self, device: str) -> int:
        """The largest message we send ``device``: ours, or its own if its hello named a
        smaller one (a device configured with a lower --max-payload than the hub)."""
        theirs = (self.known.get(device) or {}).get("max_payload")
        return min(self.max_payload, int(theirs)) if theirs else self.max_payload

    # -- main thread ---------------------------------------------------------------------
    def send_logits(self, device: str, rnd: int, ids, logits, wait: bool = True,
                    feature_epoch: str | None = None) -> None:
        """Send a device its server logits (kept for a re-request), naming the feature
        epoch the hub holds its maps under (None: it holds none; send full maps)."""
        per_chunk = rows_per_message(self.payload_for(device), 8 + 4 * self.hub.num_classes)
        codec = self.run_spec.logits_codec if self.run_spec else LOGITS_CODEC
        msgs = logits_messages(device, rnd, ids, logits, per_chunk, codec,
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
            self.uploads, self.dropped = {}, set()
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
            if len(self.known) < min_devices:  # a line for logs too, not only the status bar
                log.info("waiting for devices: %d of %d joined (up to %.0f s)",
                         len(self.known), min_devices, timeout)
            while len(self.known) < min_devices and not self.stopped.is_set():
                left = t_end - time.monotonic()
                if left <= 0:
                    raise NoDevicesError(f"only {len(self.known)} of {min_devices} devices "
                                         f"joined within {timeout:.0f}s")
                on_status(f"waiting for devices: {len(self.known)}/{min_devices}")
                self.cond.wait(timeout=min(left, 1.0))

    def status(self, mode: str, rounds: int, round_deadline: float, **extra) -> HubStatus:
        # dict() copies are single C calls, safe while the network thread inserts
        ups = list(self.uploads.items())
        return HubStatus(mode, self.round, rounds, self.phase, round_deadline,
                         dict(self.known), {d: u.complete for d, u in ups},
                         dict(self.rejected), self.link.bytes_received, self.link.bytes_sent,
                         class_report=self.class_report,
                         run_id=self.run_spec.run_id if self.run_spec else None,
                         **extra, quarantined=dict(self.quarantined),
                         rows={d: u.rows for d, u in ups}, delivery=self._delivered())

    def _delivered(self) -> dict | None:
        report = self.delivery.report if self.delivery is not None else None
        return asdict(report) if report is not None else None
