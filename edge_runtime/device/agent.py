"""`gkt-edge run`: the device side of GKT over MQTT.

The paho network thread only decodes, validates and queues; the main thread trains,
uploads and applies logits. Every upload chunk is acknowledged by the hub and resent
until it is; logits that do not arrive are asked for again. Progress is saved after
every round, so a restarted device resumes where it stopped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.device.exit_codes import EXIT_AUTH, EXIT_NEW_RUN, EXIT_REFUSED, EXIT_USAGE
from edge_runtime.device.model_store import ModelReceiver
from edge_runtime.device.throttle import DeviceSpeed, Throttle
from edge_runtime.device.upload import upload_messages
from edge_runtime.mqtt.link import MqttLink
from edge_runtime.mqtt.reliable import ReliableSender, SendCancelled
from edge_runtime.protocol import refusal, topics, wire
from edge_runtime.protocol.codecs import FEATURE_CODEC
from edge_runtime.protocol.device_metrics import device_metrics
from edge_runtime.protocol.limits import DEFAULT_MAX_PAYLOAD, max_packet_size
from edge_runtime.protocol.messages import LOGITS_CODEC, parse_logits
from edge_runtime.protocol.refresh_policy import DEFAULT_POLICY, RefreshPolicy
from edge_runtime.protocol.round_auth import RoundGuard

if TYPE_CHECKING:
    from edge_runtime.device.own_data_source import OwnDataSource

log = logging.getLogger("gkt.edge")
MODEL_GRACE_S = 30.0  # at "stop", how long a model still arriving is waited for


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    codec: str = FEATURE_CODEC
    state_dir: str = "gkt-edge-state"
    max_payload: int = DEFAULT_MAX_PAYLOAD  # largest message sent (protocol/limits.py)
    window: int = 8  # un-acknowledged chunks in flight
    ack_timeout: float = 5.0
    upload_deadline: float = 600.0
    logits_timeout: float = 30.0  # ask the hub again after this long without logits
    evaluate_local: bool = True  # report the local classifier's test accuracy
    mode: str = "sync"  # async: no round announcements; go again as soon as our logits come
    speed: DeviceSpeed = DeviceSpeed()  # simulated slowness (throttle.py); default: none
    run_id: str | None = None  # the adopted run spec's (device/adopt.py), named in hello
    round_key: bytes | None = None  # follow only round announcements signed with it
    refresh: str = DEFAULT_POLICY  # which feature maps to upload (refresh.py)
    logits_codec: str = LOGITS_CODEC
    send_logits: bool = True  # the run spec's device_logits: upload our logits
    new_run: bool = False  # another run announced: exit EXIT_NEW_RUN (a restart joins it)

    def __post_init__(self) -> None:
        RefreshPolicy.parse(self.refresh)  # refuses a bad policy now, not mid-round


class EdgeAgent:
    """A device's side of the federation over MQTT: hello, follow round announcements,
    train, upload features reliably, apply the hub's logits, save progress."""

    def __init__(self, link: MqttLink, device: EdgeDevice, cfg: AgentConfig,
                 test_loader=None, own_data: OwnDataSource | None = None,
                 spec_watch=None) -> None:
        """``own_data``: the device's own images, rescanned before each round; their
        held-out part (if any) replaces ``test_loader`` for the local accuracy.
        ``spec_watch``: the adopted run's RunSpecWatch (device/adopt.py); the agent stops
        (exit 2) if the hub starts announcing another run."""
        self.link = link
        self.spec_watch = spec_watch
        self.adopted = spec_watch.spec if spec_watch is not None else None
        self.device = device
        self.cfg = cfg
        self.own_data = own_data
        self.test_loader = own_data.val_loader() if own_data is not None else test_loader
        self.state_dir = Path(cfg.state_dir)
        self.inbox: queue.Queue[wire.Message] = queue.Queue()
        self.rejected = 0
        self._announcement: dict | None = None
        self._announced = threading.Condition()
        self._sender: ReliableSender | None = None
        self._stop = threading.Event()
        self.throttle = Throttle(cfg.speed, self._stop)
        self._train_seconds: float | None = None  # of the last round, reported to the hub
        self.policy = RefreshPolicy.parse(cfg.refresh)
        self._resync = threading.Event()  # the hub holds other maps than our upload assumed
        self.auth_refused: str | None = None  # why the broker refused us, if it did
        self.refused: str | None = None  # a fatal reason the hub gave, if it did
        self.guard = RoundGuard(cfg.round_key, cfg.run_id)
        self._ignored = 0  # announcements ignored (logged the first times)
        self._quarantined = -1  # the last round whose upload the hub could not use
        link.on_auth_refused = self._on_auth_refused
        self._session_lost = threading.Event()  # logits sent to us may be gone: ask again
        link.on_session_lost = self._session_lost.set
        self.models = ModelReceiver(link, device.device_id, self.state_dir)  # delivered models

    # -- network thread ------------------------------------------------------------------
    def _on_round(self, topic: str, payload: bytes) -> None:
        msg = self._decode(topic, payload)
        if msg is None or msg.kind != "round":
            return
        why = self.guard.why_not(msg.round, msg.meta)
        if why is not None:
            self._ignored += 1
            if self._ignored <= 5 or self._ignored % 100 == 0:
                log.warning("%s: ignoring a round %d %r announcement (%s; %d ignored)",
                            self.device.device_id, msg.round, msg.meta.get("state"), why,
                            self._ignored)
            return
        with self._announced:
            self._announcement = {"round": msg.round, **msg.meta}
            self._announced.notify_all()
        sender = self._sender
        if msg.meta.get("state") == "stop" and sender is not None:
            sender.cancel()  # async: the run ended mid-upload; nobody will ack it any more

    def _on_down(self, topic: str, payload: bytes) -> None:
        msg = self._decode(topic, payload)
        if msg is None:
            return
        if msg.kind == "ack":
            if msg.meta.get("resync"):
                self._resync.set()
            sender = self._sender
            if sender is not None:
                for mid in msg.meta.get("msg_ids", []):
                    sender.ack(str(mid))
        elif msg.kind == "logits":
            self.inbox.put(msg)
        elif msg.kind == "model":
            try:
                self.models.on_model(msg)
            except (wire.WireError, OSError) as err:
                self._reject(topic, f"model: {err}")
        elif msg.kind == "reject":
            self._on_reject(msg)
        else:
            self._reject(topic, f"unexpected kind {msg.kind!r}")

    def _decode(self, topic: str, payload: bytes) -> wire.Message | None:
        if not payload:  # a cleared retained message
            return None
        try:
            return wire.decode_message(payload, max_bytes=max_packet_size(self.cfg.max_payload))
        except wire.WireError as err:
            self._reject(topic, f"{err.reason}: {err}")
            return None

    def _on_reject(self, msg: wire.Message) -> None:
        """The hub refused something of ours: stop if a retry cannot help, else go on."""
        reason, detail = msg.meta["reason"], msg.meta["detail"]
        dev = self.device.device_id
        if msg.meta["fatal"]:
            log.error("%s: the hub refused us (%s): %s; stopping (exit %d): a restart would be "
                      "refused again", dev, reason, detail, EXIT_REFUSED)
            self.refused = reason
            self.stop()
            return
        log.warning("%s: the hub refused %s (%s): %s", dev, msg.meta["refused"] or "a message",
                    reason, detail)
        if reason == refusal.UNKNOWN_DEVICE:  # the hub lost us: introduce ourselves again
            self._hello(wait=False)
        elif reason == refusal.FUTURE_ROUND and self._sender is not None:
            self._sender.cancel()  # we follow a round the hub never opened: wait for it
        elif reason == refusal.QUARANTINED:
            self._quarantined = msg.round  # no logits will come for that round

    def _reject(self, topic: str, why: str) -> None:
        self.rejected += 1
        log.warning("rejected message on %s: %s", topic, why)

    # -- main thread ---------------------------------------------------------------------
    def _on_auth_refused(self, why: str) -> None:
        log.error("%s: the broker refused our credentials (%s): revoked, or a wrong "
                  "password; stopping (exit %d)", self.device.device_id, why, EXIT_AUTH)
        self.auth_refused = why
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        sender = self._sender
        if sender is not None:
            sender.cancel()
        with self._announced:
            self._announced.notify_all()

    def run(self) -> int:
        """Serve rounds until the hub says stop or stop() is called (0), the broker
        refuses our credentials (EXIT_AUTH), or the hub announces another run (EXIT_USAGE;
        with ``new_run`` EXIT_NEW_RUN, which a service manager restarts)."""
        rc = self._serve()
        if self.auth_refused:
            return EXIT_AUTH
        if self.refused:
            return EXIT_REFUSED
        if self.run_moved:
            return EXIT_NEW_RUN if self.cfg.new_run else EXIT_USAGE
        return rc

    @property
    def run_moved(self) -> bool:
        if self.spec_watch is None or self.adopted is None:
            return False
        diffs = self.spec_watch.moved_from(self.adopted)
        if diffs and not self._stop.is_set():
            new_run = self.cfg.new_run
            then = ("Restarted, it keeps run {old} under {dir}/runs and joins the new one"
                    if new_run else "Start it again with --new-run to keep the old run "
                    "under {dir}/runs and join the new one")
            log.log(logging.WARNING if new_run else logging.ERROR,
                    "%s: the hub now runs %s, not %s (%s); this device's state belongs to "
                    "the old run: stopping (exit %d). %s", self.device.device_id,
                    self.spec_watch.spec.run_id, self.adopted.run_id, "; ".join(diffs),
                    EXIT_NEW_RUN if new_run else EXIT_USAGE,
                    then.format(old=self.adopted.run_id, dir=self.state_dir))
            self.stop()
        return bool(diffs)

    def _serve(self) -> int:
        dev = self.device
        if dev.load(self.state_dir):
            log.info("%s: resumed from %s (last completed round %d)", dev.device_id,
                     self.state_dir, dev.progress.completed_round)
        self.link.subscribe(topics.down(dev.device_id), self._on_down)
        self.link.subscribe(topics.ROUND_TOPIC, self._on_round)
        self._hello()
        if self.cfg.mode == "async":
            return self._run_async()
        seen: tuple | None = None
        while not self._stop.is_set():
            ann = self._wait_announcement(seen)
            if ann is None or self.run_moved:
                continue
            seen = (ann["round"], ann.get("state"), ann.get("epoch"))
            state, rnd = ann.get("state"), int(ann["round"])
            if state == "stop":
                self._finished()
                return 0
            if state == "collect" and rnd > dev.progress.completed_round:
                self._round(rnd)
        return 0

    def _finished(self) -> None:
        log.info("%s: hub finished the federation", self.device.device_id)
        # the hub stops waiting for acks after a while: a model still on its way (a slow
        # link) is in the broker's queue for us, so take it before leaving
        if self.models.offered and not self.models.wait_complete(MODEL_GRACE_S):
            log.warning("%s: the hub's model did not arrive complete within %.0f s; "
                        "`gkt-edge fetch-model` asks for it again", self.device.device_id,
                        MODEL_GRACE_S)
        if self.models.stored:  # the next thing a person wants to type
            log.info("%s: classify images with: gkt-edge predict --state-dir %s IMAGES...",
                     self.device.device_id, self.state_dir)

    def _run_async(self) -> int:
        """Asynchronous GKT: train, upload, wait for our own logits, again, until stop."""
        while not self._stop.is_set() and not self.run_moved:
            if (self._announcement or {}).get("state") == "stop":
                self._finished()
                break
            self._round(self.device.progress.completed_round + 1)
        return 0

    def _throttled(self, items: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        """Stretch producing and sending each message to the simulated device and link."""
        while True:
            t0 = time.perf_counter()
            item = next(items, None)
            if item is None:
                return
            self.throttle.after(time.perf_counter() - t0)
            self.throttle.transfer(len(item[1]))
            yield item

    def _hello(self, wait: bool = True) -> None:
        dev = self.device
        meta = {"num_samples": dev.num_samples, "num_classes": dev.bank.num_classes,
                "codec": self.cfg.codec, "completed_round": dev.progress.completed_round,
                "image_size": int(dev._extract.dataset[0][0].shape[-1]),
                "feature_epoch": dev.mirror.epoch,
                "max_payload": self.cfg.max_payload,  # the hub sends us nothing larger
                "device_metrics": device_metrics(dev.num_samples,
                                                 skipped_files=self._skipped_files())}
        if self.cfg.run_id is not None:
            meta["run_id"] = self.cfg.run_id
        payload = wire.encode_message("hello", dev.device_id, max(dev.progress.completed_round, 0),
                                      {}, msg_id=f"hello-{uuid.uuid4().hex[:8]}", meta=meta)
        # Retained, so a hub that starts (or restarts) after us still learns we exist.
        self.link.publish(topics.up(dev.device_id), payload, retain=True, wait=wait)

    def _wait_announcement(self, seen: tuple | None) -> dict | None:
        with self._announced:
            while not self._stop.is_set():
                ann = self._announcement
                if ann is not None and (ann["round"], ann.get("state"), ann.get("epoch")) != seen:
                    return ann
                self._announced.wait(timeout=1.0)
                if self.run_moved:
                    return None
        return None

    def _skipped_files(self) -> int | None:
        return self.own_data.skipped_files if self.own_data is not None else None

    def _round(self, rnd: int) -> None:
        dev = self.device
        if self.own_data is not None:
            self.own_data.refresh(dev)
            self.test_loader = self.own_data.val_loader()
        self._session_lost.clear()  # only a loss after this point can take this round's logits
        t0 = time.perf_counter()
        stats = self.throttle.run(lambda: dev.train(self.policy.frozen(rnd)))
        self._train_seconds = time.perf_counter() - t0
        local_acc = dev.local_accuracy(self.test_loader) if self.test_loader else None
        log.info("%s: round %d trained locally (loss %.3f, %d distilled) in %.1fs", dev.device_id,
                 rnd, stats.loss, stats.distilled, time.perf_counter() - t0)
        try:
            self._upload(rnd, local_acc)
        except SendCancelled:
            if not self._stop.is_set():
                log.warning("%s: round %d upload abandoned; waiting for the hub's next round",
                            dev.device_id, rnd)
            return  # stopping: this round is redone after a restart
        except TimeoutError as err:  # the hub never acknowledged: it is not in this round
            log.warning("%s: round %d upload not acknowledged (%s); waiting for the hub",
                        dev.device_id, rnd, err)
            return
        if self._await_logits(rnd):
            dev.progress.completed_round = rnd
            dev.save(self.state_dir)
            log.info("%s: round %d complete in %.1fs", dev.device_id, rnd,
                     time.perf_counter() - t0)

    def _upload(self, rnd: int, local_acc: float | None) -> None:
        """Send the round's upload; once more with full maps if the hub asks to resync."""
        for _ in range(2):
            self._resync.clear()
            self._send_upload(rnd, local_acc)
            if not self._resync.is_set():
                return
            log.info("%s: the hub holds other feature maps than we assumed; sending full "
                     "maps", self.device.device_id)
            self.device.mirror.invalidate()

    def _send_logits(self) -> bool:
        """Whether the hub distils from our logits, as its newest run spec says: a hub
        restarted with another --server-alpha announces it without a new run."""
        live = self.spec_watch.spec if self.spec_watch is not None else None
        return live.device_logits if live is not None else self.cfg.send_logits

    def _send_upload(self, rnd: int, local_acc: float | None) -> None:
        dev = self.device
        upload_id = f"r{rnd}-{uuid.uuid4().hex[:8]}"
        meta = {"edge_accuracy": local_acc,
                "device_metrics": device_metrics(dev.num_samples, self._train_seconds,
                                                 local_acc, self._skipped_files())}
        messages = upload_messages(dev, rnd, upload_id, self.cfg.max_payload, self.cfg.codec,
                                   self.policy,
                                   self.cfg.logits_codec if self._send_logits() else None, meta)
        self._sender = ReliableSender(self.link, topics.up(dev.device_id),
                                      window=self.cfg.window, ack_timeout=self.cfg.ack_timeout,
                                      deadline=self.cfg.upload_deadline)
        if self._stop.is_set():  # stop() came while we trained, before this sender existed
            self._sender.cancel()
        try:
            self._sender.send(self._throttled(messages))
        finally:
            self._sender = None

    def _await_logits(self, rnd: int) -> bool:
        """Apply logits for round ``rnd`` until every sample has one; False if the hub moved on."""
        dev = self.device
        missing = set(dev.sample_ids.tolist())
        last = time.monotonic()
        grace = 0.0  # don't give up before the hub could answer our last request
        while missing and not self._stop.is_set():
            if self._session_lost.is_set():  # what the hub sent while we were away is gone
                self._session_lost.clear()
                self._request_logits(rnd, len(missing), "the broker lost our session")
                last = time.monotonic()
                grace = last + min(self.cfg.logits_timeout, 5.0)
            try:
                msg = self.inbox.get(timeout=0.5)
            except queue.Empty:
                if self._session_lost.is_set():
                    continue  # ask again first (above), then judge whether the hub moved on
                ann = self._announcement or {}
                moved_on = self.cfg.mode == "sync" and int(ann.get("round", rnd)) > rnd
                if self._quarantined == rnd:
                    log.warning("%s: the hub dropped our round %d upload; not waiting for its "
                                "logits", dev.device_id, rnd)
                    return False
                if (ann.get("state") == "stop" or moved_on) and time.monotonic() > grace:
                    log.warning("%s: hub moved past round %d before our logits arrived",
                                dev.device_id, rnd)
                    return False
                if time.monotonic() - last > self.cfg.logits_timeout:
                    self._request_logits(rnd, len(missing),
                                         f"none in {self.cfg.logits_timeout:.0f} s; the hub "
                                         "may still be training")
                    last = time.monotonic()
                continue
            if msg.round != rnd:
                continue
            chunk = parse_logits(msg)
            if dev.mirror.pending_epoch is not None or dev.mirror.epoch is not None:
                dev.mirror.confirm(chunk.feature_epoch)  # the first chunk settles it
            self.throttle.transfer(chunk.logits.numel() * 4 + len(chunk.ids) * 8)
            try:
                dev.receive_logits(chunk.ids, chunk.logits)
            except ValueError as err:
                self._reject(topics.down(dev.device_id), str(err))
                continue
            missing.difference_update(chunk.ids.tolist())
            last = time.monotonic()
        return not missing

    def _request_logits(self, rnd: int, missing: int, why: str) -> None:
        dev = self.device
        log.info("%s: asking the hub again for round %d logits (%d missing; %s)",
                 dev.device_id, rnd, missing, why)
        req = wire.encode_message("logits_request", dev.device_id, rnd, {},
                                  msg_id=f"req-{uuid.uuid4().hex[:8]}", meta={"round": rnd})
        self.link.publish(topics.up(dev.device_id), req, wait=False)
