"""The synchronous round loop: announce, collect, train, send logits, evaluate, checkpoint.

``RoundLoop`` runs on the main thread while the ``UploadIntake`` (intake.py) fills the
round from the network thread. What differs between one hub process and K hub workers
(server_hub/workers/) is held by two small collaborators:

- ``peers``: how the processes that receive uploads agree (restore, subscribe, wait for
  devices, the round's view, the decision, stopping). ``LocalPeers`` is one process;
  ``workers.service.WorkerPeers`` exchanges state through collectives, rank 0 decides.
- ``trainer``: the server training step, the logits to send and the evaluation.
  ``LocalTrainer`` uses the ``Hub``; ``workers.service.DdpTrainer`` trains with DDP.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from edge_runtime.mqtt.link import MqttLink
from edge_runtime.protocol import refusal, round_auth, topics, wire
from server_hub.assembly.exit_codes import EXIT_NO_DEVICES, EXIT_OK
from server_hub.hub import Evaluation, Hub
from server_hub.intake import NoDevicesError, UploadIntake
from server_hub.monitoring.results import RoundRecord
from server_hub.run.evaluation import class_report
from server_hub.run.spec_store import checkpoint_fields, publish_run_spec
from server_hub.trainer import ServerStats

if TYPE_CHECKING:
    from server_hub.service import ServiceConfig

log = logging.getLogger("gkt.hub")

REANNOUNCE_S = 5.0


class Announcer:
    """Publishes the retained round announcement devices follow (only the leader speaks)."""

    def __init__(self, link: MqttLink, intake: UploadIntake, speaks: bool = True) -> None:
        self.link, self.intake, self.speaks = link, intake, speaks
        self.last: bytes | None = None
        self.nonce = uuid.uuid4().hex[:16]  # this hub process, in every announcement
        # devices follow only announcements signed with the run's round key
        self.round_key = round_auth.read_key(round_auth.load_or_create_key(
            intake.registry.path.parent)) if speaks else b""

    def announce(self, state: str, deadline: float | None = None) -> None:
        if not self.speaks:
            return
        rnd = self.intake.round
        meta = round_auth.sign(self.round_key, max(rnd, 0), {
            "state": state, "deadline": deadline, "epoch": uuid.uuid4().hex[:8],
            "run": self.intake.registry.run_id, "hub": self.nonce, "issued": time.time()})
        payload = wire.encode_message("round", "hub", max(rnd, 0), {},
                                      msg_id=f"round-{rnd}-{state}", meta=meta)
        self.last = payload
        self.link.publish(topics.ROUND_TOPIC, payload, retain=True)

    def publish_run_spec(self) -> None:
        """Devices wait for the spec before they say hello: published before anything."""
        if self.speaks and self.intake.run_spec is not None:
            publish_run_spec(self.link, self.intake.run_spec)

    def reannounce(self) -> None:
        """Publish the same announcement again: a broker killed before its autosave loses
        retained messages, and devices that join later need it. Same epoch, so devices
        that saw it already ignore it."""
        if self.last is not None and self.link.connected:
            self.link.publish(topics.ROUND_TOPIC, self.last, retain=True, wait=False)
            if self.intake.run_spec is not None:
                publish_run_spec(self.link, self.intake.run_spec, wait=False)


class Peers(Protocol):
    """How the processes receiving uploads agree on a round (one hub or K workers)."""

    leads: bool  # this process announces rounds, records them and checkpoints
    log_prefix: str

    def restore(self) -> int: ...
    def start(self) -> None: ...
    def stopping(self) -> bool: ...
    def wait_for_devices(self, on_status: Callable[[str], None]) -> None: ...
    def open_round(self, rnd: int) -> None: ...
    def view(self) -> tuple[dict, int, bool]: ...
    def agree(self, decision: str | None) -> str: ...
    def pause(self, view: tuple) -> None: ...
    def total_bytes_down(self, down: int) -> int: ...


class Trainer(Protocol):
    """The round's server step, the logits to send and the evaluation."""

    def train(self, rnd: int, done: dict) -> tuple[ServerStats, str]: ...
    def logits(self, devices: list[str]) -> dict[str, tuple[np.ndarray, object]]: ...
    def commit_features(self, devices: list[str], done: dict) -> None: ...
    def evaluate(self, devices: list[str]) -> Evaluation: ...


class LocalPeers:
    """One hub process: it alone receives, decides and leads."""

    leads = True
    log_prefix = ""

    def __init__(self, intake: UploadIntake, cfg: ServiceConfig) -> None:
        self.intake, self.cfg = intake, cfg

    def restore(self) -> int:
        return self.intake.hub.resume(Path(self.cfg.state_dir))

    def start(self) -> None:
        self.intake.listen()

    def stopping(self) -> bool:
        return self.intake.stopped.is_set()

    def wait_for_devices(self, on_status: Callable[[str], None]) -> None:
        self.intake.wait_for_devices(self.cfg.min_devices, self.cfg.start_timeout, on_status)

    def open_round(self, rnd: int) -> None:
        self.intake.open_round(rnd)

    def view(self) -> tuple[dict, int, bool]:
        with self.intake.cond:
            return self.intake.view()

    def agree(self, decision: str | None) -> str:
        assert decision is not None
        return decision

    def pause(self, view: tuple) -> None:
        """Wait until a message changes the view (at most 1 s)."""
        with self.intake.cond:
            self.intake.cond.wait_for(lambda: self.intake.view() != view, timeout=1.0)

    def total_bytes_down(self, down: int) -> int:
        return down


class LocalTrainer:
    """The server step, logits and evaluation of one hub process (``Hub``)."""

    def __init__(self, hub: Hub, test_loader) -> None:
        self.hub, self.test_loader = hub, test_loader
        self.quarantined: dict[str, str] = {}  # device -> why, from the last train()

    def train(self, rnd: int, done: dict) -> tuple[ServerStats, str]:
        stats = self.hub.train(sorted(done))
        self.quarantined = dict(self.hub.quarantined)
        return stats, f"{stats.samples} samples"

    def logits(self, devices: list[str]) -> dict[str, tuple[np.ndarray, object]]:
        out = {}
        for d in devices:
            ids, z = self.hub.logits_for(d)
            out[d] = (ids.numpy(), z)
        return out

    def commit_features(self, devices: list[str], done: dict) -> None:
        """Hold what the round trained on, under each upload's feature epoch."""
        self.hub.commit_features(devices, {d: done[d].epoch for d in devices})

    def evaluate(self, devices: list[str]) -> Evaluation:
        if self.test_loader is None:  # no held-out data at the hub
            return Evaluation({})
        return self.hub.evaluate(self.test_loader, devices)


class RoundLoop:
    """Runs the rounds; the leader applies the rules (min devices, deadline, extensions)."""

    def __init__(self, intake: UploadIntake, announcer: Announcer, peers: Peers,
                 trainer: Trainer, cfg: ServiceConfig, data_cfg,
                 report: Callable[[RoundRecord], None],
                 on_status: Callable[[str], None]) -> None:
        self.intake, self.announcer, self.peers, self.trainer = intake, announcer, peers, trainer
        self.cfg, self.data_cfg = cfg, data_cfg
        self.report, self.on_status = report, on_status
        self.started = time.perf_counter()  # records' elapsed: the time axis of plots

    def run(self) -> int:
        self.announcer.publish_run_spec()
        start = self.peers.restore()
        self.peers.start()
        try:
            self.peers.wait_for_devices(self.on_status)
            for rnd in range(start, self.cfg.rounds):
                if self.peers.stopping():
                    break
                self.run_round(rnd)
        except NoDevicesError as err:
            if not self.intake.stopped.is_set():
                log.error("%s", err)
                return EXIT_NO_DEVICES
        if self.intake.stopped.is_set():  # SIGTERM: not the end of the federation: no "stop"
            log.info("stopped; a restart resumes after the last checkpoint")
            return EXIT_OK
        self.intake.phase = "done"
        delivery = self.intake.delivery
        if delivery is not None and self.announcer.speaks:  # before "stop": devices exit on it
            self.on_status("delivering models")
            delivery.deliver(sorted(self.intake.known))
        self.announcer.announce("stop")
        return EXIT_OK

    def collect(self, rnd: int) -> dict:
        """Open round ``rnd`` and wait for uploads; the complete uploads by device."""
        self.peers.open_round(rnd)
        deadline = time.time() + self.cfg.round_deadline
        self.announcer.announce("collect", deadline)
        extensions, last_announce = 0, time.monotonic()
        known = self.intake.known
        while True:
            view = self.peers.view()
            done, got, stop = view
            decision = "stop" if stop else None
            if decision is None and self.peers.leads:
                if time.monotonic() - last_announce > REANNOUNCE_S:
                    self.announcer.reannounce()
                    last_announce = time.monotonic()
                self.on_status(f"round {rnd}: {len(done)}/{len(known)} devices uploaded, "
                               f"{got / 1e6:.1f} MB in")
                waited = (self.intake.registry.waited_for(rnd) & set(known)
                          ) - self.intake.dropped
                decision = round_decision(len(done), set(done) >= waited,
                                          self.cfg.min_devices, time.time() >= deadline,
                                          extensions < self.cfg.max_extensions)
                if decision == "extend":
                    extensions += 1
                    deadline = time.time() + self.cfg.round_deadline
                    log.warning("round %d: %d of %d required devices uploaded; extending the "
                                "deadline (%d/%d)", rnd, len(done), self.cfg.min_devices,
                                extensions, self.cfg.max_extensions)
                    self.announcer.announce("collect", deadline)
                elif decision == "go" and len(done) < self.cfg.min_devices:
                    log.warning("round %d: going on with %d devices (< min %d)", rnd,
                                len(done), self.cfg.min_devices)
                elif decision == "go" and set(done) < set(known):
                    log.warning("round %d%s: going on with %d of %d devices", rnd,
                                " deadline" if time.time() >= deadline else "", len(done),
                                len(known))
            decision = self.peers.agree(decision)
            if decision == "go":
                break
            if decision == "stop":
                raise NoDevicesError("stopped")
            if decision == "fail":
                raise NoDevicesError(f"round {rnd}: no device uploaded before the deadline")
            self.peers.pause(view)
        with self.intake.cond:
            self.intake.phase = "train"
        return done

    def run_round(self, rnd: int) -> None:
        t0 = time.perf_counter()
        down0 = self.intake.bytes_down
        done = self.collect(rnd)
        devices = sorted(done)
        t_collect = time.perf_counter()
        self.announcer.announce("train")
        self.on_status(f"round {rnd}: training the server on {len(devices)} devices")
        stats, trained = self.trainer.train(rnd, done)
        devices = self.drop_quarantined(devices, getattr(self.trainer, "quarantined", {}))
        t_train = time.perf_counter()
        self.intake.sent = {}  # only this round's logits are sent again on request
        logits = self.trainer.logits(devices)
        bad = {d: "nonfinite_logits" for d, (_, z) in logits.items()
               if not bool(z.isfinite().all())}
        devices = self.drop_quarantined(devices, bad)
        done = {d: done[d] for d in devices}
        self.intake.registry.uploaded(devices, rnd)
        self.trainer.commit_features(devices, done)  # between logits and publishing them
        held = self.intake.hub.held
        for d, (ids, z) in logits.items():  # a hub worker: the devices it trained on
            if d in done:
                self.intake.send_logits(d, rnd, ids, z, feature_epoch=held.epoch(d))
        seconds = time.perf_counter() - t0
        ev = self.trainer.evaluate(devices)
        log.info("%sround %d: collect %.1fs, train %.1fs (%s), logits %.1fs, eval %.1fs",
                 self.peers.log_prefix, rnd, t_collect - t0, t_train - t_collect, trained,
                 t0 + seconds - t_train, time.perf_counter() - t0 - seconds)
        down = self.peers.total_bytes_down(self.intake.bytes_down - down0)
        if self.peers.leads:
            accs = [u.edge_accuracy for u in done.values() if u.edge_accuracy is not None]
            spec = self.intake.run_spec
            if ev.confusion is not None:
                self.intake.class_report = class_report(ev.confusion,
                                                        spec and list(spec.classes))
            report = self.intake.class_report
            rec = RoundRecord(rnd, ev.mean, sum(u.bytes for u in done.values()), down,
                              round(seconds, 3), float(np.mean(accs)) if accs else None,
                              stats.loss, elapsed=round(time.perf_counter() - self.started, 3),
                              per_class_accuracy=report and report["per_class_accuracy"])
            hub = self.intake.hub
            meta = hub.checkpoint_meta(rnd, self.data_cfg, ev.mean)
            hub.save(Path(self.cfg.state_dir),
                     {**meta, **(checkpoint_fields(spec) if spec else {})})
        self.intake.journal.drop(rnd)
        if self.peers.leads:
            self.report(rec)

    def drop_quarantined(self, devices: list[str], why: dict[str, str]) -> list[str]:
        """Leave out the devices training could not use; count, log and tell them."""
        rnd = self.intake.round
        for d, reason in sorted(why.items()):
            self.intake.quarantined[reason] += 1
            log.warning("round %d: quarantined %s's upload (%s); the round goes on without "
                        "it", rnd, d, reason)
            if self.peers.leads:
                self.intake.link.publish(topics.down(d), refusal.reject_message(
                    d, rnd, refusal.QUARANTINED, f"round {rnd}: {reason}"), wait=False)
        return [d for d in devices if d not in why]


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
