"""In-process GKT on a heterogeneous fleet, sync or async, against the wall clock.

Every device is a thread throttled to its DeviceSpeed, so a round of the synchronous
runner lasts as long as its slowest device, while in the asynchronous one the hub trains
continuously and each device goes at its own pace. Evaluation is deferred: the runs
snapshot the models (a few MB) and evaluate after the clock stops, so neither mode's
timeline pays for bookkeeping.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.device.throttle import DeviceSpeed, Throttle
from edge_runtime.learning.data import make_loader
from edge_runtime.learning.models import EdgeResNet8
from edge_runtime.learning.train import accuracy
from server_hub.async_mode.hub import AsyncHub
from server_hub.async_mode.rules import AsyncConfig, finished, should_evaluate
from server_hub.feature_bank import DeviceFeatures
from server_hub.hub import Hub
from server_hub.models import build_server
from server_hub.monitoring.results import RoundRecord, RunResult
from server_hub.simulation.inproc import (
    FederationConfig,
    Progress,
    Setup,
    make_devices,
    raw_download_bytes,
    raw_upload_bytes,
    state_bytes,
)
from server_hub.trainer import extractor_from_state, split_accuracy

Tensors = dict[str, torch.Tensor]


def _copy(state: Tensors) -> Tensors:
    return {k: v.detach().clone() for k, v in state.items()}


@dataclass
class LocalUpload:
    features: DeviceFeatures
    extractor: Tensors
    model: Tensors  # the whole edge model, for the deferred edge-accuracy evaluation
    nbytes: int


@dataclass
class Snapshot:
    round: int
    elapsed: float
    seconds: float
    server: Tensors
    extractors: dict[str, Tensors]
    edge_models: dict[str, Tensors]
    upload: int
    download: int
    loss: float | None
    updates: int | None = None


def local_round(dev: EdgeDevice, th: Throttle) -> LocalUpload:
    """Train, extract and upload (raw fp32 bytes over the throttled link)."""
    th.run(dev.train)
    batches = th.run(lambda: list(dev.features()))
    feats = DeviceFeatures(*(torch.cat([getattr(b, f) for b in batches])
                             for f in ("ids", "features", "logits", "labels")))
    extractor = dev.extractor_state()
    nbytes = raw_upload_bytes(len(feats.ids), tuple(feats.features.shape[1:]),
                              dev.bank.num_classes) + state_bytes(extractor)
    th.transfer(nbytes)
    return LocalUpload(feats, extractor, _copy(dev.model.state_dict()), nbytes)


def apply_logits(dev: EdgeDevice, th: Throttle, ids: torch.Tensor, logits: torch.Tensor) -> int:
    nbytes = raw_download_bytes(len(ids), dev.bank.num_classes)
    th.transfer(nbytes)
    dev.receive_logits(ids.numpy(), logits)
    return nbytes


def evaluate_snapshots(snaps: list[Snapshot], cfg: FederationConfig,
                       test_split) -> list[RoundRecord]:
    ncls = cfg.data.num_classes
    loader = make_loader(test_split.dataset, 256, shuffle=False)
    server, edge = build_server(cfg.server.model, ncls), EdgeResNet8(ncls)
    out = []
    for s in snaps:
        server.load_state_dict(s.server)
        test = [split_accuracy(extractor_from_state(e), server, loader)
                for e in s.extractors.values()]
        edges = []
        for m in s.edge_models.values():
            edge.load_state_dict(m)
            edges.append(accuracy(edge, loader))
        out.append(RoundRecord(s.round, float(np.mean(test)) if test else 0.0, s.upload,
                               s.download, round(s.seconds, 3),
                               float(np.mean(edges)) if edges else None, s.loss,
                               round(s.elapsed, 3), s.updates))
    return out


def _finish(result: RunResult, snaps: list[Snapshot], cfg: FederationConfig, setup: Setup,
            on_round: Progress | None) -> RunResult:
    for rec in evaluate_snapshots(snaps, cfg, setup.test):
        result.rounds.append(rec)
        if on_round:
            on_round(rec)
    return result


def _result(cfg: FederationConfig, fleet: list[DeviceSpeed], mode: str, extra: dict) -> RunResult:
    config = {**asdict(cfg), "fleet": [asdict(s) for s in fleet], **extra}
    return RunResult("gkt", cfg.data.dataset, cfg.devices, config, mode=mode,
                     evaluation="hub-side, deferred: snapshots of each device's extractor + the "
                                "server model, evaluated after the run")


def run_gkt_sync_fleet(cfg: FederationConfig, setup: Setup, fleet: list[DeviceSpeed],
                       on_round: Progress | None = None) -> RunResult:
    """Synchronous GKT with the devices in parallel: each round waits for the slowest."""
    devices, hub = make_devices(cfg, setup), Hub(cfg.data.num_classes, cfg.server, cfg.seed)
    throttles = [Throttle(s) for s in fleet]
    names = [d.device_id for d in devices]
    snaps: list[Snapshot] = []
    t_start = time.perf_counter()
    with ThreadPoolExecutor(len(devices)) as pool:
        for rnd in range(cfg.rounds):
            t0 = time.perf_counter()
            hub.start_round()
            ups = list(pool.map(local_round, devices, throttles))
            for name, up in zip(names, ups):
                hub.receive_features(name, up.features)
                hub.receive_extractor(name, up.extractor)
            stats = hub.train(names)
            logits = [hub.logits_for(n) for n in names]
            down = sum(pool.map(lambda d, t, z: apply_logits(d, t, *z), devices, throttles,
                                logits))
            now = time.perf_counter()
            snaps.append(Snapshot(rnd, now - t_start, now - t0, _copy(hub.model.state_dict()),
                                  dict(hub.extractors), {n: u.model for n, u in zip(names, ups)},
                                  sum(u.nbytes for u in ups), down, stats.loss))
    return _finish(_result(cfg, fleet, "sync", {}), snaps, cfg, setup, on_round)


def run_gkt_async_fleet(cfg: FederationConfig, setup: Setup, fleet: list[DeviceSpeed],
                        acfg: AsyncConfig, on_round: Progress | None = None) -> RunResult:
    """Asynchronous GKT: the hub trains on whatever has arrived; no device waits for another."""
    devices, hub = make_devices(cfg, setup), Hub(cfg.data.num_classes, cfg.server, cfg.seed)
    ahub = AsyncHub(hub, acfg)
    stop, arrived, lock = threading.Event(), threading.Event(), threading.Lock()
    inbox: dict[str, queue.Queue] = {d.device_id: queue.Queue() for d in devices}
    edge_models: dict[str, Tensors] = {}
    totals = {"up": 0, "down": 0}

    def device_loop(dev: EdgeDevice, speed: DeviceSpeed) -> None:
        th = Throttle(speed, stop)
        update = 0
        while not stop.is_set():
            up = local_round(dev, th)
            if stop.is_set():
                return
            edge_models[dev.device_id] = up.model
            ahub.merge(dev.device_id, up.features, up.extractor, update)
            with lock:
                totals["up"] += up.nbytes
            arrived.set()
            while not stop.is_set():
                try:
                    ids, z = inbox[dev.device_id].get(timeout=0.2)
                except queue.Empty:
                    continue
                n = apply_logits(dev, th, ids, z)
                with lock:
                    totals["down"] += n
                update += 1
                break

    threads = [threading.Thread(target=device_loop, args=(d, s), daemon=True,
                                name=f"device-{d.device_id}") for d, s in zip(devices, fleet)]
    snaps: list[Snapshot] = []
    losses: list[float] = []
    last = {"t": 0.0, "v": 0, "up": 0, "down": 0}
    t_start = time.perf_counter()

    def snapshot() -> None:
        now = time.perf_counter() - t_start
        with lock:
            up, down = totals["up"], totals["down"]
        snaps.append(Snapshot(len(snaps), now, now - last["t"], _copy(hub.model.state_dict()),
                              ahub.extractors(), dict(edge_models), up - last["up"],
                              down - last["down"], float(np.mean(losses)) if losses else None,
                              ahub.version))
        last.update(t=now, v=ahub.version, up=up, down=down)
        losses.clear()

    for t in threads:
        t.start()
    while not finished(acfg, ahub.version, time.perf_counter() - t_start):
        loss = ahub.train_steps(1)
        if loss is None:  # nothing has arrived yet
            arrived.wait(0.1)
            arrived.clear()
            continue
        losses.append(loss)
        for d in ahub.due():
            _, ids, z = ahub.take_logits(d)
            inbox[d].put((ids, z))
        if should_evaluate(acfg, ahub.version, last["v"], time.perf_counter() - t_start,
                           last["t"]):
            snapshot()
    stop.set()
    if not snaps or ahub.version != last["v"]:
        snapshot()
    for t in threads:
        t.join(60)
    return _finish(_result(cfg, fleet, "async", {"async": asdict(acfg)}), snaps, cfg, setup,
                   on_round)
