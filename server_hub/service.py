"""`gkt-hub serve`: the synchronous hub service, assembled from its parts.

The paho network thread hands every device message to the ``UploadIntake`` (intake.py:
decode, validate, store, journal, ack); the main thread runs the ``RoundLoop`` (rounds.py:
announce, wait for devices, train, send logits, evaluate, checkpoint). Anything that does
not validate is logged, counted and dropped; the model is only touched by the main thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_runtime.mqtt.link import MqttLink
from edge_runtime.protocol.limits import DEFAULT_MAX_PAYLOAD
from edge_runtime.protocol.run_spec import RunSpec
from server_hub.admission import AdmissionLimits
from server_hub.disk import DiskRoom
from server_hub.hub import Hub
from server_hub.hub_status import HubStatus
from server_hub.intake import UploadIntake
from server_hub.journal import UploadJournal
from server_hub.monitoring.results import RoundRecord
from server_hub.registry import DeviceRegistry
from server_hub.rounds import Announcer, LocalPeers, LocalTrainer, Peers, RoundLoop, Trainer


@dataclass(frozen=True)
class ServiceConfig:
    """Round rules and limits of a hub service (sync rounds; async uses the limits)."""

    state_dir: str
    rounds: int = 10
    min_devices: int = 1
    round_deadline: float = 300.0  # seconds a round waits for uploads
    max_extensions: int = 3  # deadline extensions while fewer than min_devices uploaded
    start_timeout: float = 600.0  # seconds to wait for the first min_devices devices
    max_payload: int = DEFAULT_MAX_PAYLOAD  # largest message sent (edge_runtime.protocol.limits)
    # announced retained; then a hello must name its run id (server_hub/run/spec_store.py)
    run_spec: RunSpec | None = None
    run_id: str = ""  # "" = the state dir's (generated once, kept in registry.json)
    admission: AdmissionLimits = AdmissionLimits()


def make_intake(link: MqttLink, hub: Hub, cfg: ServiceConfig, data_cfg,
                journal: UploadJournal | None = None, rounds: bool = True) -> UploadIntake:
    """The intake of a service with ``cfg``: the state dir's journal and device registry,
    the admission limits and the run's feature size (the hub's input size, if it has one)."""
    journal = journal or UploadJournal(Path(cfg.state_dir) / "uploads")
    spec = cfg.run_spec
    run_id = cfg.run_id or (spec.run_id if spec else "")
    # the run spec's input size: an own-data run's data_cfg is the default dataset's
    size = spec.preprocess["size"] if spec else getattr(data_cfg, "size", None)
    intake = UploadIntake(link, hub, journal, cfg.max_payload,
                          DeviceRegistry(cfg.state_dir, run_id), cfg.admission, size,
                          rounds=rounds, run_spec=spec)
    intake.disk = DiskRoom(cfg.state_dir)
    return intake


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
        """``observer.on_accepted(device, msg, size, merged, completed)`` after each accepted
        message."""
        self.intake.observers.append(observer)


class HubService(IntakeControls):
    """One hub process running synchronous rounds over an MQTT link.

    ``intake`` receives (network thread), ``loop`` runs the rounds (``run``, main thread);
    ``stop`` (SIGTERM) ends the run after the current step, ``status`` is what monitoring
    reads. ``on_round`` is called with each round's record.
    """

    mode = "sync"

    def __init__(self, link: MqttLink, hub: Hub, cfg: ServiceConfig, data_cfg,
                 test_loader, on_round: Callable[[RoundRecord], None] | None = None,
                 on_status: Callable[[str], None] | None = None) -> None:
        intake = make_intake(link, hub, cfg, data_cfg)
        self.assemble(link, hub, cfg, data_cfg, intake, LocalPeers(intake, cfg),
                      LocalTrainer(hub, test_loader), on_round, on_status)

    def assemble(self, link: MqttLink, hub: Hub, cfg: ServiceConfig, data_cfg,
                 intake: UploadIntake, peers: Peers, trainer: Trainer,
                 on_round: Callable[[RoundRecord], None] | None,
                 on_status: Callable[[str], None] | None, speaks: bool = True) -> None:
        """Put the parts together (hub workers pass theirs: server_hub/workers/service.py)."""
        self.link, self.hub, self.cfg = link, hub, cfg
        self.on_round = on_round
        self.intake = intake
        self.announcer = Announcer(link, intake, speaks)
        self.loop = RoundLoop(intake, self.announcer, peers, trainer, cfg, data_cfg,
                              self._report, on_status or (lambda s: None))

    def _report(self, rec: RoundRecord) -> None:
        if self.on_round:
            self.on_round(rec)

    def run(self) -> int:
        return self.loop.run()

    @property
    def class_report(self) -> dict | None:
        """The last evaluation's per-class report (server_hub/run/evaluation.py)."""
        return self.intake.class_report

    def status(self) -> HubStatus:
        return self.intake.status(self.mode, self.cfg.rounds, self.cfg.round_deadline)
