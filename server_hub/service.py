"""`gkt-hub serve`: round coordination over MQTT around the transport-free ``Hub``.

The paho network thread decodes, validates, stores and acknowledges uploads; the main
thread announces rounds, waits for devices (never past the deadline), trains, sends
logits, evaluates and checkpoints. Anything that does not validate is logged, counted
and dropped; the model is only touched by the main thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.mqtt.link import MqttLink
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.messages import logits_messages, parse_extractor, parse_feature_chunk
from server_hub.checkpoint import latest_checkpoint, load_checkpoint
from server_hub.feature_bank import DeviceFeatures
from server_hub.hub import Evaluation, Hub
from server_hub.journal import UploadJournal
from server_hub.results import RoundRecord
from server_hub.trainer import ServerStats
from server_hub.uplink.held import Resync

log = logging.getLogger("gkt.hub")

EXIT_OK, EXIT_NO_DEVICES = 0, 3
REANNOUNCE_S = 5.0


@dataclass(frozen=True)
class ServiceConfig:
    state_dir: str
    rounds: int = 10
    min_devices: int = 1
    round_deadline: float = 300.0  # seconds a round waits for uploads
    max_extensions: int = 3  # deadline extensions while fewer than min_devices uploaded
    start_timeout: float = 600.0  # seconds to wait for the first min_devices devices
    max_payload: int = 256 * 1024  # largest message we accept or send (broker's packet limit)


@dataclass
class Upload:
    """One device's upload for the current round."""

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


class NoDevicesError(RuntimeError):
    pass


class HubService:
    def __init__(self, link: MqttLink, hub: Hub, cfg: ServiceConfig, data_cfg,
                 test_loader, on_round: Callable[[RoundRecord], None] | None = None,
                 on_status: Callable[[str], None] | None = None) -> None:
        self.link = link
        self.hub = hub
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.test_loader = test_loader
        self.on_round = on_round
        self.on_status = on_status or (lambda s: None)
        self.known: dict[str, dict] = {}  # device -> its hello
        self.uploads: dict[str, Upload] = {}
        self.rejected: Counter[str] = Counter()
        self.round = -1
        self.phase = "idle"
        self.last_logits: dict[str, list[bytes]] = {}  # this round's, for re-requests
        self.logits_round = -1
        self.bytes_down = 0
        self.journal = UploadJournal(Path(cfg.state_dir) / "uploads")
        self._announcement: bytes | None = None
        self.listening = threading.Event()  # set once uploads are subscribed to
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.started = time.perf_counter()  # records' elapsed: the time axis of plots
        self.observers: list = []  # on_accepted(service, device, msg, size)

    # -- network thread ------------------------------------------------------------------
    def _on_up(self, topic: str, payload: bytes, replay: bool = False) -> None:
        if not payload:  # a device clearing its retained hello
            return
        try:
            device = topics.device_from_topic(topic)
            msg = wire.decode_message(payload, max_bytes=self.cfg.max_payload)
            if msg.device != device:
                raise wire.WireError("spoofed", f"header names device {msg.device!r} "
                                                f"on {device!r}'s topic")
            self._handle(device, msg, payload, replay)
            self._notify("on_accepted", device, msg, len(payload))
        except (wire.WireError, ValueError) as err:
            reason = getattr(err, "reason", "invalid")
            self.rejected[reason] += 1
            log.warning("rejected message on %s (%s): %s", topic, reason, err)

    def _handle(self, device: str, msg: wire.Message, msg_bytes: bytes,
                replay: bool = False) -> None:
        size = len(msg_bytes)
        if msg.kind == "hello":
            ncls = msg.meta.get("num_classes")
            if ncls != self.hub.num_classes:
                raise wire.WireError("schema", f"device {device} has {ncls} classes, "
                                               f"the hub {self.hub.num_classes}")
            with self._cond:
                first = device not in self.known
                self.known[device] = dict(msg.meta)
                self._cond.notify_all()
            if first:
                log.info("device %s joined (%s samples, codec %s)", device,
                         msg.meta.get("num_samples"), msg.meta.get("codec"))
            return
        if msg.kind == "logits_request":
            self._resend_logits(device, msg.round)
            return
        if msg.kind not in ("features", "extractor", "upload_done"):
            raise wire.WireError("unexpected", f"kind {msg.kind!r} is not sent to the hub")
        with self._cond:
            self._require_known(device, msg.kind, replay)
            if msg.round != self.round or self.phase != "collect":
                if msg.round > self.round:
                    raise wire.WireError("future_round", f"round {msg.round} not open yet "
                                                         f"(hub is in round {self.round})")
                # Stale: acknowledge so the device stops resending, but use nothing.
                self.rejected["stale_round"] += 1
                self._ack(device, msg.msg_id)
                return
            try:
                stored = self._store(device, msg, size, replay)
            except Resync as err:  # the device must send full maps (docs/uplink.md)
                self.rejected["resync"] += 1
                log.info("%s", err)
                if not replay:
                    self._ack(device, msg.msg_id, resync=True)
                return
            self._cond.notify_all()
        if replay:
            return
        ack = lambda: self._ack(device, msg.msg_id)  # noqa: E731
        if stored:  # acked once the journal's group commit made it durable
            self.journal.record(self.round, device, msg_bytes, then=ack)
        else:  # a duplicate: its first copy may still be waiting for that commit
            self.journal.after_commit(ack)

    def _require_known(self, device: str, kind: str, replay: bool) -> None:
        if replay:  # it was accepted before the crash, so the device was known
            self.known.setdefault(device, {})
        if device not in self.known:
            raise wire.WireError("unknown_device", f"{device} sent {kind} before hello")

    def _store(self, device: str, msg: wire.Message, size: int, replay: bool) -> bool:
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

    def _ack(self, device: str, msg_id: str, resync: bool = False) -> None:
        meta = {"msg_ids": [msg_id], **({"resync": True} if resync else {})}
        payload = wire.encode_message("ack", device, max(self.round, 0), {},
                                      msg_id=f"ack-{uuid.uuid4().hex[:8]}", meta=meta)
        self.bytes_down += len(payload)
        self.link.publish(topics.down(device), payload, wait=False)

    def _resend_logits(self, device: str, rnd: int) -> None:
        if rnd > self.round:
            raise wire.WireError("future_round", f"{device} asked for round {rnd} logits; the "
                                                 f"hub is in round {self.round}")
        msgs = self.last_logits.get(device) if rnd == self.logits_round else None
        if not msgs:  # not trained yet (they will come), or an old round: nothing to do
            log.debug("%s asked for round %d logits; none to send yet", device, rnd)
            return
        log.info("resending %d logits chunks to %s", len(msgs), device)
        for m in msgs:
            self.link.publish(topics.down(device), m, wait=False)

    # -- main thread ---------------------------------------------------------------------
    def _logits(self, device: str) -> tuple[np.ndarray, object]:
        ids, logits = self.hub.logits_for(device)
        return ids.numpy(), logits

    def _notify(self, event: str, *args) -> None:
        for observer in self.observers:
            getattr(observer, event)(self, *args)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def wait_stopped(self, timeout: float) -> bool:
        """Whether ``stop`` was called within ``timeout`` seconds."""
        return self._stop.wait(timeout)

    def _announce(self, state: str, deadline: float | None = None) -> None:
        meta = {"state": state, "deadline": deadline, "epoch": uuid.uuid4().hex[:8]}
        payload = wire.encode_message("round", "hub", max(self.round, 0), {},
                                      msg_id=f"round-{self.round}-{state}", meta=meta)
        self._announcement = payload
        self.link.publish(topics.ROUND_TOPIC, payload, retain=True)

    def _reannounce(self) -> None:
        """Publish the same announcement again: a broker killed before its autosave loses
        retained messages, and devices that join later need it. Same epoch, so devices
        that saw it already ignore it."""
        if self._announcement is not None and self.link.connected:
            self.link.publish(topics.ROUND_TOPIC, self._announcement, retain=True, wait=False)

    # The round loop. Hub workers (server_hub/workers.py) run this same loop and override
    # the hooks marked "hook": how uploads are received and seen, how the decision is
    # agreed, and the training, logits and evaluation steps (besides _restore,
    # _wait_for_devices and _announce, which they do through collectives or rank 0).
    def run(self) -> int:
        start = self._restore()
        self._start()
        self.listening.set()
        try:
            self._wait_for_devices()
            for rnd in range(start, self.cfg.rounds):
                if self._stopping():
                    break
                self._run_round(rnd)
        except NoDevicesError as err:
            if not self._stop.is_set():
                log.error("%s", err)
                return EXIT_NO_DEVICES
        if self._stop.is_set():  # SIGTERM: not the end of the federation, so no "stop"
            log.info("stopped; a restart resumes after the last checkpoint")
            return EXIT_OK
        self.phase = "done"
        self._announce("stop")
        return EXIT_OK

    leads = True  # hook: this process announces rounds, records them and checkpoints
    log_prefix = ""  # hook: names the worker in its log lines

    def _start(self) -> None:
        """Hook: receive uploads."""
        self.link.subscribe(topics.UP_WILDCARD, self._on_up)

    def _stopping(self) -> bool:
        """Hook: whether to stop before the next round (SIGTERM)."""
        return self._stop.is_set()

    def _restore(self) -> int:
        found = latest_checkpoint(Path(self.cfg.state_dir))
        if found is None:
            return 0
        ckpt = load_checkpoint(found)
        self.hub.restore(ckpt)
        log.info("resumed from %s (round %d)", found, ckpt.round)
        return ckpt.round + 1

    def _replay(self, rnd: int) -> None:
        """Re-apply what this round accepted before a crash (validated again)."""
        n = 0
        for device, payload in self.journal.replay(rnd):
            self._on_up(topics.up(device), payload, replay=True)
            n += 1
        if n:
            done = sum(u.complete for u in self.uploads.values())
            log.info("round %d: replayed %d accepted messages from disk (%d devices complete)",
                     rnd, n, done)

    def _wait_for_devices(self) -> None:
        t_end = time.monotonic() + self.cfg.start_timeout
        with self._cond:
            while len(self.known) < self.cfg.min_devices and not self._stop.is_set():
                left = t_end - time.monotonic()
                if left <= 0:
                    raise NoDevicesError(f"only {len(self.known)} of {self.cfg.min_devices} "
                                         f"devices joined within {self.cfg.start_timeout:.0f}s")
                self.on_status(f"waiting for devices: {len(self.known)}/{self.cfg.min_devices}")
                self._cond.wait(timeout=min(left, 1.0))

    def _open_round(self, rnd: int) -> None:
        """Hook: start taking round ``rnd``'s uploads."""
        with self._cond:
            self.round, self.phase = rnd, "collect"
            self.uploads = {}
            self.hub.start_round()
        self._replay(rnd)

    def _round_view(self) -> tuple[dict, int, bool]:
        """Hook: (complete uploads by device, bytes in, stop asked)."""
        with self._cond:
            return self._view()

    def _view(self) -> tuple[dict, int, bool]:
        done = {d: u for d, u in sorted(self.uploads.items()) if u.complete}
        return done, sum(u.bytes for u in self.uploads.values()), self._stop.is_set()

    def _agree(self, decision: str | None) -> str:
        """Hook: the decision every process follows (workers: rank 0's)."""
        assert decision is not None
        return decision

    def _pause(self, view: tuple) -> None:
        """Hook: wait until a message changes the view (at most 1 s)."""
        with self._cond:
            self._cond.wait_for(lambda: self._view() != view, timeout=1.0)

    def _collect(self, rnd: int) -> dict:
        """Open round ``rnd`` and wait for uploads; the complete uploads by device. The
        leader applies the rules (min devices, deadline, extensions) on its clock."""
        self._open_round(rnd)
        deadline = time.time() + self.cfg.round_deadline
        self._announce("collect", deadline)
        extensions, last_announce = 0, time.monotonic()
        while True:
            view = self._round_view()
            done, got, stop = view
            decision = "stop" if stop else None
            if decision is None and self.leads:
                if time.monotonic() - last_announce > REANNOUNCE_S:
                    self._reannounce()
                    last_announce = time.monotonic()
                self.on_status(f"round {rnd}: {len(done)}/{len(self.known)} devices uploaded, "
                               f"{got / 1e6:.1f} MB in")
                decision = round_decision(len(done), set(done) >= set(self.known),
                                          self.cfg.min_devices, time.time() >= deadline,
                                          extensions < self.cfg.max_extensions)
                if decision == "extend":
                    extensions += 1
                    deadline = time.time() + self.cfg.round_deadline
                    log.warning("round %d: %d of %d required devices uploaded; extending the "
                                "deadline (%d/%d)", rnd, len(done), self.cfg.min_devices,
                                extensions, self.cfg.max_extensions)
                    self._announce("collect", deadline)
                elif decision == "go" and len(done) < self.cfg.min_devices:
                    log.warning("round %d: going on with %d devices (< min %d)", rnd,
                                len(done), self.cfg.min_devices)
                elif decision == "go" and set(done) < set(self.known):
                    log.warning("round %d deadline: going on with %d of %d devices", rnd,
                                len(done), len(self.known))
            decision = self._agree(decision)
            if decision == "go":
                break
            if decision == "stop":
                raise NoDevicesError("stopped")
            if decision == "fail":
                raise NoDevicesError(f"round {rnd}: no device uploaded before the deadline")
            self._pause(view)
        with self._cond:
            self.phase = "train"
        return done

    def _train_round(self, rnd: int, devices: list[str]) -> tuple[ServerStats, str]:
        """Hook: train the server on ``devices``' features; (stats, what was trained)."""
        stats = self.hub.train(devices)
        return stats, f"{stats.samples} samples"

    def _round_logits(self, devices: list[str]) -> dict[str, tuple[np.ndarray, object]]:
        """Hook: (sample ids, server logits) to send each device."""
        return {d: self._logits(d) for d in devices}

    def _evaluate_devices(self, devices: list[str]) -> Evaluation:
        """Hook: test accuracy of extractor_k + server for ``devices``."""
        return self.hub.evaluate(self.test_loader, devices)

    def _commit_features(self, devices: list[str], done: dict) -> None:
        """Hook: hold what the round trained on, under each upload's feature epoch."""
        self.hub.commit_features(devices, {d: done[d].epoch for d in devices})

    def _bytes_down(self, down: int) -> int:
        """Hook: bytes the hub sent this round (workers: all of them)."""
        return down

    def _run_round(self, rnd: int) -> None:
        t0 = time.perf_counter()
        down0 = self.bytes_down
        done = self._collect(rnd)
        devices = sorted(done)
        t_collect = time.perf_counter()
        self._announce("train")
        self.on_status(f"round {rnd}: training the server on {len(devices)} devices")
        stats, trained = self._train_round(rnd, devices)
        t_train = time.perf_counter()
        per_chunk = max(1, (self.cfg.max_payload - 4096) // (8 + 4 * self.hub.num_classes))
        round_logits = self._round_logits(devices)
        self._commit_features(devices, done)
        logits = {d: logits_messages(d, rnd, ids, z, per_chunk,
                                     feature_epoch=self.hub.held.epoch(d))
                  for d, (ids, z) in round_logits.items()}
        self.last_logits, self.logits_round = logits, rnd
        for d, msgs in logits.items():
            for m in msgs:
                self.link.publish(topics.down(d), m)
                self.bytes_down += len(m)
        seconds = time.perf_counter() - t0
        ev = self._evaluate_devices(devices)
        log.info("%sround %d: collect %.1fs, train %.1fs (%s), logits %.1fs, eval %.1fs",
                 self.log_prefix, rnd, t_collect - t0, t_train - t_collect, trained,
                 t0 + seconds - t_train, time.perf_counter() - t0 - seconds)
        down = self._bytes_down(self.bytes_down - down0)
        if self.leads:
            accs = [u.edge_accuracy for u in done.values() if u.edge_accuracy is not None]
            rec = RoundRecord(rnd, ev.mean, sum(u.bytes for u in done.values()), down,
                              round(seconds, 3), float(np.mean(accs)) if accs else None,
                              stats.loss, elapsed=round(time.perf_counter() - self.started, 3))
            self.hub.save(Path(self.cfg.state_dir),
                          self.hub.checkpoint_meta(rnd, self.data_cfg, ev.mean))
        self.journal.drop(rnd)
        if self.leads and self.on_round:
            self.on_round(rec)


def round_decision(done: int, all_done: bool, min_devices: int, deadline_passed: bool,
                   extensions_left: bool) -> str:
    """What a collecting round does next: wait | go | extend | fail."""
    enough = done >= min_devices
    if enough and all_done:
        return "go"
    if not deadline_passed:
        return "wait"
    if enough:
        return "go"
    if extensions_left:
        return "extend"
    return "go" if done else "fail"
