"""The hub side of model delivery: export each device's composed model, send it, track acks.

The exporter lives in export/ (onnx, onnxruntime), which the hub may not import: it is
found through the ``gkt_edge_toolkit.model_export`` entry point, as the device catalog is
(server_hub/simulation/speeds.py). A hub without the ``[export]`` extra trains as before
and says once that it delivers no models.

At the end of a run ``deliver`` exports the latest checkpoint's composed graphs, sends
each device its own (fp32 and int8, chunked ``model`` messages) and waits, bounded, for
every device's ``model_ack``. A ``model_request`` (``gkt-edge fetch-model``) is answered
from the last export if it is of the latest checkpoint, else by exporting on a worker
thread: the network thread never exports.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import distributions
from pathlib import Path

from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.model_transfer import ModelFile, model_messages
from server_hub.checkpoint import latest_checkpoint, load_checkpoint

log = logging.getLogger("gkt.hub")

EXPORT_ENTRY_POINT = "gkt_edge_toolkit.model_export"  # export/deliver.py provides it
Exporter = Callable[..., dict]  # (checkpoint, devices, out_dir, **options) -> dev -> files


def find_exporter() -> Exporter | None:
    """The installed exporter, or None (the ``[export]`` extra or the package is missing).

    Every distribution is searched: a stale egg-info in a source checkout would hide it
    from ``entry_points()``, which keeps the first metadata found per package name."""
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == EXPORT_ENTRY_POINT:
                try:
                    return ep.load()
                except ImportError as err:  # onnx / onnxruntime not installed
                    log.warning("model delivery off: the exporter needs %s (pip install "
                                "'gkt-edge-toolkit[export]')", err.name)
                    return None
    log.warning("model delivery off: no %s entry point (is gkt-edge-toolkit installed?)",
                EXPORT_ENTRY_POINT)
    return None


@dataclass(frozen=True)
class DeliveryConfig:
    data_root: str = "data"
    test_data: str | None = None  # own-data runs: the held-out folder export verifies on
    int8: bool = True  # also deliver the int8 QDQ graph
    max_payload: int = 256 * 1024  # bytes per message (the broker's packet limit)
    ack_timeout: float = 120.0  # how long the end of a run waits for devices' acks
    # a model_request is a few bytes in and megabytes out: one answer a device this often
    request_interval: float = 10.0
    run_id: str | None = None


@dataclass
class DeliveryReport:
    """The end-of-run delivery: what went where, and how long it took."""

    round: int
    export_s: float = 0.0
    seconds_to_all_acked: float | None = None  # from the start of the delivery
    bytes_on_wire: dict[str, int] = field(default_factory=dict)  # device -> bytes sent
    file_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    acked: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class ModelDelivery:
    def __init__(self, link, state_dir: str | Path, cfg: DeliveryConfig,
                 exporter: Exporter | None = None) -> None:
        self.link = link
        self.state_dir = Path(state_dir)
        self.cfg = cfg
        self.exporter = exporter
        self.models: dict[str, dict[str, ModelFile]] = {}  # device -> variant -> file
        self.acks: dict[str, set[tuple[int, str]]] = {}  # device -> {(round, variant)}
        self.report: DeliveryReport | None = None
        self._cond = threading.Condition()
        self._export_lock = threading.Lock()
        self._requests: queue.Queue[str] = queue.Queue()
        self._asked: dict[str, float] = {}  # device -> when its last request was taken
        self._worker: threading.Thread | None = None
        # the largest message a device takes (the hub's intake knows from its hello)
        self.payload_for: Callable[[str], int] = lambda device: cfg.max_payload

    # -- export --------------------------------------------------------------------------
    def export(self, devices: list[str]) -> int | None:
        """Export the latest checkpoint's composed models for ``devices`` (those in it);
        the checkpoint's round, or None if there is none yet."""
        path = latest_checkpoint(self.state_dir)
        if path is None or self.exporter is None:
            return None
        ckpt = load_checkpoint(path)
        todo = sorted(set(devices) & set(ckpt.extractors))
        out = self.state_dir / "models" / path.name
        with self._export_lock:
            have = {d for d in todo if self._round_of(d) == ckpt.round}
            todo = [d for d in todo if d not in have]
            if todo:
                files = self.exporter(str(path), todo, str(out), data_root=self.cfg.data_root,
                                      test_data=self.cfg.test_data, run_id=self.cfg.run_id,
                                      int8=self.cfg.int8)
                with self._cond:
                    for device, variants in files.items():
                        self.models[device] = {
                            v: ModelFile(ckpt.round, v, Path(p).read_bytes())
                            for v, p in variants.items()}
        return ckpt.round

    def _round_of(self, device: str) -> int | None:
        with self._cond:
            files = self.models.get(device)
            return next(iter(files.values())).round if files else None

    # -- send ------------------------------------------------------------------------------
    def send(self, device: str, wait: bool = True) -> int:
        """Send ``device`` its current model(s); bytes on the wire (0: none to send)."""
        with self._cond:
            files = dict(self.models.get(device, {}))
        sent = 0
        for variant in sorted(files):  # fp32 first: the one predict uses by default
            model = files[variant]
            limit = min(self.cfg.max_payload, self.payload_for(device))
            for payload in model_messages(device, model, limit, sorted(files)):
                self.link.publish(topics.down(device), payload, wait=wait)
                sent += len(payload)
        return sent

    def deliver(self, devices: list[str]) -> DeliveryReport | None:
        """End of a run: export, send every device its model, wait for the acks (bounded)."""
        t0 = time.perf_counter()
        try:
            rnd = self.export(devices)
        except Exception:  # the run is over either way: devices must still hear "stop"
            log.exception("model delivery: exporting the composed models failed")
            return None
        if rnd is None:
            return None
        rep = DeliveryReport(rnd, export_s=round(time.perf_counter() - t0, 3))
        targets = [d for d in sorted(devices) if self._round_of(d) == rnd]
        for d in targets:
            rep.bytes_on_wire[d] = self.send(d)
            rep.file_bytes[d] = {v: len(m.data) for v, m in self.models[d].items()}
        want = {d: {(rnd, v) for v in self.models[d]} for d in targets}
        with self._cond:
            done = self._cond.wait_for(
                lambda: all(want[d] <= self.acks.get(d, set()) for d in targets),
                self.cfg.ack_timeout)
            rep.acked = sorted(d for d in targets if want[d] <= self.acks.get(d, set()))
        rep.missing = sorted(set(devices) - set(rep.acked))
        if done:
            rep.seconds_to_all_acked = round(time.perf_counter() - t0, 3)
        log.info("models of round %d delivered to %d/%d devices in %.1fs (export %.1fs, "
                 "%d bytes)%s", rnd, len(rep.acked), len(devices), time.perf_counter() - t0,
                 rep.export_s, sum(rep.bytes_on_wire.values()),
                 f"; no ack from {', '.join(rep.missing)}" if rep.missing else "")
        self.report = rep
        return rep

    # -- network thread --------------------------------------------------------------------
    def on_message(self, device: str, msg: wire.Message) -> None:
        if msg.kind == "model_ack":
            with self._cond:
                self.acks.setdefault(device, set()).add((msg.round, msg.meta["variant"]))
                self._cond.notify_all()
            log.info("device %s stored its round %d %s model", device, msg.round,
                     msg.meta["variant"])
        elif msg.kind == "model_request":
            now = time.monotonic()
            with self._cond:
                if now - self._asked.get(device, -math.inf) < self.cfg.request_interval:
                    # a repeat: answered by the copy already on its way
                    log.debug("device %s asked for its model again within %.0f s; ignored",
                              device, self.cfg.request_interval)
                    return
                self._asked[device] = now
            self._requests.put(device)
            self._start_worker()

    def _start_worker(self) -> None:
        with self._cond:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve_requests, daemon=True,
                                                name="gkt-model-requests")
                self._worker.start()

    def _serve_requests(self) -> None:
        while True:
            device = self._requests.get()
            try:
                rnd = self.export([device])
                if rnd is None or self._round_of(device) != rnd:
                    log.info("device %s asked for its model: none yet (it needs a completed "
                             "round with its extractor)", device)
                    continue
                log.info("device %s asked for its model: sending round %d", device, rnd)
                self.send(device)
            except Exception:  # a request must never kill the worker; the hub keeps running
                log.exception("answering %s's model request failed", device)



def model_delivery(link, state_dir: str | Path, data_root: str, max_payload: int,
                   test_data: str | None = None) -> ModelDelivery | None:
    """Delivery for a hub whose devices should get their models, if the exporter is here.
    ``test_data``: an own-data run's held-out folder (its models are verified on it)."""
    exporter = find_exporter()
    if exporter is None:
        return None
    return ModelDelivery(link, state_dir, DeliveryConfig(data_root, test_data,
                                                         max_payload=max_payload), exporter)
