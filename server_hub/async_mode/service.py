"""`gkt-hub serve --mode async`: asynchronous GKT over MQTT around the transport-free AsyncHub.

No rounds: the network thread validates, acknowledges and journals uploads with the same
``UploadIntake`` as the synchronous service (server_hub/intake.py), with its own rule for
upload messages: a device's upload is merged into the bank the moment it is complete. The
main thread trains the server continuously, sends each device its logits once its features
have been trained on (rules.py), evaluates every N merges or T seconds and checkpoints.
Nothing ever waits for a particular device.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from edge_runtime.protocol import wire
from server_hub.assembly.exit_codes import EXIT_NO_DEVICES, EXIT_OK
from server_hub.async_mode.hub import AsyncHub
from server_hub.async_mode.rules import AsyncConfig, finished, should_evaluate
from server_hub.async_mode.state import AsyncState, load_state, save_state
from server_hub.hub_status import HubStatus
from server_hub.intake import NoDevicesError, Upload
from server_hub.monitoring.results import RoundRecord
from server_hub.rounds import REANNOUNCE_S, Announcer
from server_hub.service import IntakeControls, make_intake

log = logging.getLogger("gkt.hub")


class AsyncHubService(IntakeControls):
    """One hub process training continuously on whatever uploads have been merged.

    ``intake`` receives (its ``accept`` is ``_accept_update`` here), ``run`` trains,
    sends logits and evaluates; ``stop`` and ``status`` as ``HubService``'s.
    """

    mode = "async"

    def __init__(self, link, hub, cfg, acfg: AsyncConfig, data_cfg, test_loader,
                 on_round=None, on_status=None) -> None:
        self.link, self.hub, self.cfg, self.acfg = link, hub, cfg, acfg
        self.data_cfg, self.test_loader = data_cfg, test_loader
        self.on_round = on_round
        self.on_status = on_status or (lambda s: None)
        self.intake = make_intake(link, hub, cfg, data_cfg, rounds=False)
        self.intake.accept = self._accept_update
        self.intake.on_hello = self._hello
        # not "async" before run() restored the checkpoint and replayed the journal: the
        # status page, up already, would show version 0 for a hub about to resume
        self.intake.phase = "starting"
        self.announcer = Announcer(link, self.intake)
        self.ahub = AsyncHub(hub, acfg)
        self.merged: dict[str, int] = {}  # device -> its newest merged update
        self.intake.merged_update = self.merged.get
        self.upload_update: dict[str, int] = {}  # device -> update of its open upload
        self.merged_rows: dict[str, int] = {}  # device -> samples of its newest merge
        self.intake.completed = self._merged_samples
        self.bytes_merged = 0
        # counters from before a restart (empty on a first start)
        self._saved = load_state(cfg.state_dir) or AsyncState()
        # device -> msg_id of the last hello acted on (kept on disk: retained hellos are
        # re-delivered to a restarted hub and must not look like devices that lost state)
        self.hellos: dict[str, str] = dict(self._saved.hellos)

    def _merged_samples(self, device: str) -> tuple[str, int] | None:
        """(its newest merged update, the samples it held): what monitoring counts."""
        update = self.merged.get(device)
        return None if update is None else (f"update-{update}", self.merged_rows[device])

    def status(self) -> HubStatus:
        return self.intake.status(self.mode, self.cfg.rounds, self.cfg.round_deadline,
                                  version=self.ahub.version,
                                  steps=self.ahub.steps, max_updates=self.acfg.max_updates,
                                  slots=self.ahub.summary())

    # -- network thread ------------------------------------------------------------------
    def _hello(self, device: str, msg: wire.Message) -> None:
        if self.hellos.get(device) != msg.msg_id:
            self.hellos[device] = msg.msg_id  # a broker re-delivers retained hellos
            self._restarted(device, msg.meta.get("completed_round"))
            with self.intake.cond:
                self._persist()

    def _accept_update(self, device: str, msg: wire.Message, msg_bytes: bytes,
                       replay: bool) -> None:
        intake = self.intake
        with intake.cond:
            intake.require_known(device, msg.kind, replay)
            newest = max(self.merged.get(device, -1), self.upload_update.get(device, -1) - 1)
            if msg.round <= newest:
                # A resend of something merged or superseded: ack so it stops, use nothing.
                intake.rejected["stale_update"] += 1
                intake.ack(device, msg.msg_id)
                return
            self.upload_update[device] = msg.round
            if intake.store(device, msg, len(msg_bytes), replay) and not replay:
                intake.journal.record(msg.round, device, msg_bytes)
            if intake.uploads[device].complete:
                self._merge(device, msg.round, intake.uploads.pop(device), replay)
            intake.cond.notify_all()
        if not replay:
            intake.ack(device, msg.msg_id)

    def _restarted(self, device: str, completed: object) -> None:
        """A device that lost its state counts its uploads from 0 again: accept them."""
        with self.intake.cond:
            if isinstance(completed, int) and completed < self.merged.get(device, -1):
                log.info("%s restarted from update %d; accepting its uploads again", device,
                         completed + 1)
                self.intake.journal.drop_device(self.merged.pop(device), device)
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
        self.merged_rows[device] = up.rows  # what monitoring counts as received
        self.bytes_merged += up.bytes
        if old is not None:  # on disk we keep each device's newest complete upload only
            self.intake.journal.drop_device(old, device)
        if not replay:
            self._persist()
        log.info("merged %s's update %d (hub version %d)", device, update, self.ahub.version)

    def _persist(self) -> None:
        """Save the counters a restart needs (state.py); called under the lock."""
        slots = {d: (s.update, s.version) for d, s in self.ahub.slots.items()}
        save_state(self.cfg.state_dir, AsyncState(self.ahub.version, slots, dict(self.hellos)))

    # -- main thread ---------------------------------------------------------------------
    def send_logits(self, device: str) -> None:
        update, ids, z = self.ahub.take_logits(device)
        self.intake.send_logits(device, update, ids.numpy(), z, wait=False)

    def _resume(self) -> None:
        """Replay the uploads accepted before a crash (each device's newest complete one,
        and any half-done one) and restore the hub version and staleness they had."""
        self.intake.phase = "resuming"  # the status page shows it
        for update in self.intake.journal.rounds():
            self.intake.replay(update)
        if self.merged:
            base, slots = self._saved.version, self._saved.slots
            known = {d: slots[d][1] for d, u in self.merged.items()
                     if slots.get(d, (-1,))[0] == u}
            fresh = sorted(set(self.merged) - set(known))  # merged after the state was saved
            known.update({d: base + i for i, d in enumerate(fresh, 1)})
            self.ahub.restore_versions(base + len(fresh), known)
            with self.intake.cond:
                self._persist()
            log.info("resumed async state: hub version %d, newest uploads of %s",
                     self.ahub.version,
                     ", ".join(f"{d} (update {u})" for d, u in sorted(self.merged.items())))
        self.intake.phase = "async"

    def run(self) -> int:
        self.announcer.publish_run_spec()
        intake = self.intake
        intake.round = self.hub.resume(Path(self.cfg.state_dir))  # async: evaluations so far
        # Replay before subscribing: hellos (retained) then meet the bank as it was.
        self._resume()
        intake.listen()
        try:
            intake.wait_for_devices(self.cfg.min_devices, self.cfg.start_timeout,
                                    self.on_status)
        except NoDevicesError as err:
            log.error("%s", err)
            return EXIT_NO_DEVICES
        self.announcer.announce("async")
        t_start = time.monotonic()
        last = {"t": t_start, "v": self.ahub.version, "up": self.bytes_merged,
                "down": intake.bytes_down}  # after a restart: its resumed version
        announced = t_start
        losses: list[float] = []
        while not intake.stopped.is_set():
            now = time.monotonic()
            if finished(self.acfg, self.ahub.version, now - t_start):
                break
            if now - announced > REANNOUNCE_S:
                self.announcer.reannounce()
                announced = now
            loss = self.ahub.train_steps(1)
            if loss is None:  # nothing merged yet
                with intake.cond:
                    intake.cond.wait(timeout=0.5)
                continue
            losses.append(loss)
            for d in self.ahub.due():
                self.send_logits(d)
            if should_evaluate(self.acfg, self.ahub.version, last["v"], now, last["t"]):
                self._evaluate(t_start, last, losses)
            self.on_status(f"async: version {self.ahub.version}, {self.ahub.steps} steps, "
                           f"{len(self.merged)}/{len(intake.known)} devices")
        if intake.stopped.is_set():  # SIGTERM: not the end of the federation, so no "stop"
            log.info("stopped; a restart resumes from the checkpoint and the journal")
            return EXIT_OK
        if self.ahub.version != last["v"]:  # what was merged since the last evaluation
            self._evaluate(t_start, last, losses)
        intake.phase = "done"
        if intake.delivery is not None:  # before "stop": devices exit on it
            self.on_status("delivering models")
            intake.delivery.deliver(sorted(intake.known))
        self.announcer.announce("stop")
        return EXIT_OK

    def _evaluate(self, t_start: float, last: dict, losses: list[float]) -> None:
        now = time.monotonic()
        intake = self.intake
        ev = self.ahub.evaluate(self.test_loader)
        rec = RoundRecord(intake.round, ev.mean, self.bytes_merged - last["up"],
                          intake.bytes_down - last["down"], round(now - last["t"], 3),
                          self.ahub.edge_accuracy(), float(np.mean(losses)) if losses else None,
                          round(now - t_start, 3), self.ahub.version)
        log.info("async evaluation %d: accuracy %.4f at %.1fs, version %d, %d steps",
                 intake.round, ev.mean, now - t_start, self.ahub.version, self.ahub.steps)
        self.hub.save(Path(self.cfg.state_dir),
                      self.hub.checkpoint_meta(intake.round, self.data_cfg, ev.mean))
        last.update(t=time.monotonic(), v=self.ahub.version, up=self.bytes_merged,
                    down=intake.bytes_down)
        losses.clear()
        intake.round += 1
        if self.on_round:
            self.on_round(rec)
