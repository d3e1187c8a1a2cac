"""`gkt-hub serve --mode async`: asynchronous GKT over MQTT around the transport-free AsyncHub.

No rounds: the network thread validates, acknowledges and journals uploads exactly as the
synchronous service does (the same code, inherited), and merges a device's upload into the
bank the moment it is complete. The main thread trains the server continuously, sends each
device its logits once its features have been trained on (staleness.py), evaluates every
N merges or T seconds and checkpoints. Nothing ever waits for a particular device.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.messages import logits_messages
from server_hub.async_mode.hub import AsyncHub
from server_hub.async_mode.rules import AsyncConfig, finished, should_evaluate
from server_hub.async_mode.state import AsyncState, load_state, save_state
from server_hub.results import RoundRecord
from server_hub.service import (
    EXIT_NO_DEVICES,
    EXIT_OK,
    REANNOUNCE_S,
    HubService,
    NoDevicesError,
    Upload,
)

log = logging.getLogger("gkt.hub")
UPLOAD_KINDS = ("features", "extractor", "upload_done")


class AsyncHubService(HubService):
    def __init__(self, link, hub, cfg, acfg: AsyncConfig, data_cfg, test_loader,
                 on_round=None, on_status=None) -> None:
        super().__init__(link, hub, cfg, data_cfg, test_loader, on_round, on_status)
        self.acfg = acfg
        self.ahub = AsyncHub(hub, acfg)
        self.phase = "async"
        self.merged: dict[str, int] = {}  # device -> its newest merged update
        self.upload_update: dict[str, int] = {}  # device -> update of its open upload
        self.merged_rows: dict[str, int] = {}  # device -> samples of its newest merge
        self.sent: dict[str, tuple[int, list[bytes]]] = {}  # newest logits, for re-requests
        self.bytes_merged = 0
        # counters from before a restart (empty on a first start)
        self._saved = load_state(cfg.state_dir) or AsyncState()
        # device -> msg_id of the last hello acted on (kept on disk: retained hellos are
        # re-delivered to a restarted hub and must not look like devices that lost state)
        self.hellos: dict[str, str] = dict(self._saved.hellos)

    # -- network thread ------------------------------------------------------------------
    def _handle(self, device: str, msg: wire.Message, msg_bytes: bytes,
                replay: bool = False) -> None:
        if msg.kind not in UPLOAD_KINDS:  # hello, logits requests and junk: as in sync
            super()._handle(device, msg, msg_bytes, replay)
            if msg.kind == "hello" and self.hellos.get(device) != msg.msg_id:
                self.hellos[device] = msg.msg_id  # a broker re-delivers retained hellos
                self._restarted(device, msg.meta.get("completed_round"))
                with self._cond:
                    self._persist()
            return
        with self._cond:
            self._require_known(device, msg.kind, replay)
            newest = max(self.merged.get(device, -1), self.upload_update.get(device, -1) - 1)
            if msg.round <= newest:
                # A resend of something merged or superseded: ack so it stops, use nothing.
                self.rejected["stale_update"] += 1
                self._ack(device, msg.msg_id)
                return
            self.upload_update[device] = msg.round
            if self._store(device, msg, len(msg_bytes), replay) and not replay:
                self.journal.record(msg.round, device, msg_bytes)
            if self.uploads[device].complete:
                self._merge(device, msg.round, self.uploads.pop(device), replay)
            self._cond.notify_all()
        if not replay:
            self._ack(device, msg.msg_id)

    def _restarted(self, device: str, completed: object) -> None:
        """A device that lost its state counts its uploads from 0 again: accept them."""
        with self._cond:
            if isinstance(completed, int) and completed < self.merged.get(device, -1):
                log.info("%s restarted from update %d; accepting its uploads again", device,
                         completed + 1)
                self.journal.drop_device(self.merged.pop(device), device)
                self.upload_update.pop(device, None)

    def _merge(self, device: str, update: int, up: Upload, replay: bool = False) -> None:
        """The upload is complete: it replaces the device's older features in the bank
        (while replaying the journal, _resume saves the counters once at the end)."""
        # the bank that assembled it hands the features over (a spill file is renamed)
        self.ahub.merge(device, self.hub.bank, self.hub.extractors[device], update,
                        up.edge_accuracy)
        old = self.merged.get(device)
        self.merged[device] = update
        self.merged_rows[device] = up.rows  # what monitoring counts as received
        self.bytes_merged += up.bytes
        if old is not None:  # on disk we keep each device's newest complete upload only
            self.journal.drop_device(old, device)
        if not replay:
            self._persist()
        log.info("merged %s's update %d (hub version %d)", device, update, self.ahub.version)

    def _persist(self) -> None:
        """Save the counters a restart needs (async_state.py); called under the lock."""
        slots = {d: (s.update, s.version) for d, s in self.ahub.slots.items()}
        save_state(self.cfg.state_dir, AsyncState(self.ahub.version, slots, dict(self.hellos)))

    def _resend_logits(self, device: str, rnd: int) -> None:
        update, msgs = self.sent.get(device, (-1, []))
        if update != rnd or not msgs:  # not trained on yet: they will come
            log.debug("%s asked for update %d logits; none to send yet", device, rnd)
            return
        log.info("resending %d logits chunks to %s", len(msgs), device)
        for m in msgs:
            self.link.publish(topics.down(device), m, wait=False)

    # -- main thread ---------------------------------------------------------------------
    def _send_logits(self, device: str) -> None:
        update, ids, z = self.ahub.take_logits(device)
        per_chunk = max(1, (self.cfg.max_payload - 4096) // (8 + 4 * self.hub.num_classes))
        msgs = logits_messages(device, update, ids.numpy(), z, per_chunk)
        self.sent[device] = (update, msgs)
        for m in msgs:
            self.link.publish(topics.down(device), m, wait=False)
            self.bytes_down += len(m)

    def _resume(self) -> None:
        """Replay the uploads accepted before a crash (each device's newest complete one,
        and any half-done one) and restore the hub version and staleness they had."""
        self.phase = "resuming"  # the status page shows it
        for update in self.journal.rounds():
            self._replay(update)
        if self.merged:
            base, slots = self._saved.version, self._saved.slots
            known = {d: slots[d][1] for d, u in self.merged.items()
                     if slots.get(d, (-1,))[0] == u}
            fresh = sorted(set(self.merged) - set(known))  # merged after the state was saved
            known.update({d: base + i for i, d in enumerate(fresh, 1)})
            self.ahub.restore_versions(base + len(fresh), known)
            with self._cond:
                self._persist()
            log.info("resumed async state: hub version %d, newest uploads of %s",
                     self.ahub.version,
                     ", ".join(f"{d} (update {u})" for d, u in sorted(self.merged.items())))
        self.phase = "async"

    def run(self) -> int:
        self.round = self._restore()  # async: the number of evaluations so far
        # Replay before subscribing: hellos (retained) then meet the bank as it was.
        self._resume()
        self.link.subscribe(topics.UP_WILDCARD, self._on_up)
        self.listening.set()
        try:
            self._wait_for_devices()
        except NoDevicesError as err:
            log.error("%s", err)
            return EXIT_NO_DEVICES
        self._announce("async")
        t_start = time.monotonic()
        last = {"t": t_start, "v": self.ahub.version, "up": self.bytes_merged,
                "down": self.bytes_down}  # after a restart: its resumed version
        announced = t_start
        losses: list[float] = []
        while not self._stop.is_set():
            now = time.monotonic()
            if finished(self.acfg, self.ahub.version, now - t_start):
                break
            if now - announced > REANNOUNCE_S:
                self._reannounce()
                announced = now
            loss = self.ahub.train_steps(1)
            if loss is None:  # nothing merged yet
                with self._cond:
                    self._cond.wait(timeout=0.5)
                continue
            losses.append(loss)
            for d in self.ahub.due():
                self._send_logits(d)
            if should_evaluate(self.acfg, self.ahub.version, last["v"], now, last["t"]):
                self._evaluate(t_start, last, losses)
            self.on_status(f"async: version {self.ahub.version}, {self.ahub.steps} steps, "
                           f"{len(self.merged)}/{len(self.known)} devices")
        if self._stop.is_set():  # SIGTERM: not the end of the federation, so no "stop"
            log.info("stopped; a restart resumes from the checkpoint and the journal")
            return EXIT_OK
        if self.ahub.version != last["v"]:  # what was merged since the last evaluation
            self._evaluate(t_start, last, losses)
        self.phase = "done"
        self._announce("stop")
        return EXIT_OK

    def _evaluate(self, t_start: float, last: dict, losses: list[float]) -> None:
        now = time.monotonic()
        ev = self.ahub.evaluate(self.test_loader)
        rec = RoundRecord(self.round, ev.mean, self.bytes_merged - last["up"],
                          self.bytes_down - last["down"], round(now - last["t"], 3),
                          self.ahub.edge_accuracy(), float(np.mean(losses)) if losses else None,
                          round(now - t_start, 3), self.ahub.version)
        log.info("async evaluation %d: accuracy %.4f at %.1fs, version %d, %d steps", self.round,
                 ev.mean, now - t_start, self.ahub.version, self.ahub.steps)
        self.hub.save(Path(self.cfg.state_dir),
                      self.hub.checkpoint_meta(self.round, self.data_cfg, ev.mean))
        last.update(t=time.monotonic(), v=self.ahub.version, up=self.bytes_merged,
                    down=self.bytes_down)
        losses.clear()
        self.round += 1
        if self.on_round:
            self.on_round(rec)
