"""In-process federations: GKT, and the FedAvg and centralized baselines on the same split."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.device.upload import upload_messages
from edge_runtime.learning.data import DataConfig, Split, WithIds, load_split, make_loader
from edge_runtime.learning.partition import parse_partition, partition
from edge_runtime.learning.train import EdgeTrainConfig, accuracy, make_optimizer
from edge_runtime.protocol import wire
from edge_runtime.protocol.codecs import FEATURE_CODEC
from edge_runtime.protocol.messages import (
    LOGITS_CODEC,
    extractor_message,
    logits_messages,
    parse_extractor,
    parse_feature_chunk,
    parse_logits,
)
from edge_runtime.protocol.refresh_policy import DEFAULT_POLICY, RefreshPolicy
from server_hub.hub import Hub
from server_hub.models import FULL_MODELS
from server_hub.monitoring.results import RoundRecord, RunResult
from server_hub.run.evaluation import class_report
from server_hub.trainer import ServerTrainConfig
from server_hub.uplink.held import Resync

ALGORITHMS = ("gkt", "fedavg", "centralized")


@dataclass(frozen=True)
class FederationConfig:
    """One federation: data, devices, partition, rounds, seed and both sides' training."""

    data: DataConfig = field(default_factory=DataConfig)
    devices: int = 4
    partition: str = "dirichlet:0.5"
    rounds: int = 10
    seed: int = 0
    edge: EdgeTrainConfig = field(default_factory=EdgeTrainConfig)
    server: ServerTrainConfig = field(default_factory=ServerTrainConfig)
    fedavg_model: str = "resnet56"
    state_dir: str | None = None  # where GKT writes hub checkpoints and device states
    codec: str = FEATURE_CODEC  # device feature codec
    refresh: str = DEFAULT_POLICY  # feature refresh policy (docs/uplink.md)
    logits_codec: str = LOGITS_CODEC  # both ways
    max_payload: int = 256 * 1024  # largest wire message, as over MQTT

    def __post_init__(self) -> None:
        parse_partition(self.partition)
        RefreshPolicy.parse(self.refresh)
        if self.devices < 1 or self.rounds < 1:
            raise ValueError(f"need devices >= 1 and rounds >= 1, got {self.devices}, "
                             f"{self.rounds}")


@dataclass
class Setup:
    train: Split
    train_eval: Split
    test: Split
    shards: list[np.ndarray]
    num_classes: int | None = None  # own folders (simulation/own_folders.py); else the dataset's
    classes: list[str] | None = None  # their names, for the per-class report


def prepare(cfg: FederationConfig) -> Setup:
    train = load_split(cfg.data, train=True)
    plain = DataConfig(cfg.data.dataset, cfg.data.root, cfg.data.image_size, augment=False)
    train_eval = load_split(plain, train=True) if cfg.data.augment else train
    test = load_split(plain, train=False)
    shards = partition(train.targets, cfg.devices, cfg.partition, cfg.seed)
    return Setup(train, train_eval, test, shards)


def device_names(n: int) -> list[str]:
    return [f"dev{i}" for i in range(n)]


def raw_upload_bytes(n: int, feature_shape: tuple[int, ...], num_classes: int) -> int:
    """float32 features and logits plus int64 id and label, per sample."""
    return n * (4 * int(np.prod(feature_shape)) + 4 * num_classes + 16)


def raw_download_bytes(n: int, num_classes: int) -> int:
    return n * (4 * num_classes + 8)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def weights_wire_bytes(device: str, rnd: int, state: dict[str, torch.Tensor]) -> int:
    """A FedAvg model as one framed message: float weights (exact, zstd) as one vector and
    the integer counters as another (the header takes at most 64 tensors)."""
    floats = [v.reshape(-1).float() for v in state.values() if v.is_floating_point()]
    ints = [v.reshape(-1).long() for v in state.values() if not v.is_floating_point()]
    tensors = {"weights": torch.cat(floats) if floats else torch.zeros(0),
               "counters": torch.cat(ints) if ints else torch.zeros(0, dtype=torch.long)}
    return len(extractor_message(device, rnd, "model", tensors))


def ack_bytes(device: str, rnd: int) -> int:
    """What one acknowledgement costs on the wire (the hub acks every upload message)."""
    return len(wire.encode_message("ack", device, rnd, {}, msg_id="ack-00000000",
                                   meta={"msg_ids": [f"r{rnd}-00000000:0"]}))


Progress = Callable[[RoundRecord], None]


def make_devices(cfg: FederationConfig, setup: Setup) -> list[EdgeDevice]:
    return [
        EdgeDevice(name, setup.train, setup.train_eval, ids,
                   setup.num_classes or cfg.data.num_classes, cfg.edge,
                   seed=cfg.seed + i, model_seed=cfg.seed)
        for i, (name, ids) in enumerate(zip(device_names(cfg.devices), setup.shards))
    ]


def upload_round(hub: Hub, devices: list[EdgeDevice], rnd: int, cfg: FederationConfig,
                 policy: RefreshPolicy) -> tuple[dict[str, str | None], int, int]:
    """Open round ``rnd``; every device trains and uploads: (feature epochs, bytes up,
    bytes down in acks)."""
    hub.start_round()
    up = down = 0
    epochs = {}
    for dev in devices:
        dev.train(policy.frozen(rnd))
        epochs[dev.device_id], u, d = deliver_upload(hub, dev, rnd, cfg, policy)
        up, down = up + u, down + d
    return epochs, up, down


def deliver_upload(hub: Hub, dev: EdgeDevice, rnd: int, cfg: FederationConfig,
                   policy: RefreshPolicy) -> tuple[str | None, int, int]:
    """Run the device's upload through the wire format into the hub, as the MQTT service
    does (and once more with full maps if the hub asks to resync): (feature epoch, bytes
    up, bytes down in acks)."""
    up = down = 0
    for attempt in range(2):
        epoch, resync = None, False
        hub.bank.clear(dev.device_id)
        for _, payload in upload_messages(dev, rnd, f"r{rnd}-{attempt}", cfg.max_payload,
                                          cfg.codec, policy,
                                          cfg.logits_codec if cfg.server.distils else None):
            up += len(payload)
            down += ack_bytes(dev.device_id, rnd)
            msg = wire.decode_message(payload, max_bytes=cfg.max_payload)
            if msg.kind == "features":
                c = parse_feature_chunk(msg)
                try:
                    hub.receive_chunk(dev.device_id, c)
                except Resync:
                    resync = True
            elif msg.kind == "extractor":
                hub.receive_extractor(dev.device_id, parse_extractor(msg))
            else:
                epoch = msg.meta.get("epoch")
        if not resync:
            return epoch, up, down
        dev.mirror.invalidate()
    raise RuntimeError(f"{dev.device_id}: the hub refused a full upload")


def deliver_logits(hub: Hub, dev: EdgeDevice, rnd: int, ids: torch.Tensor, z: torch.Tensor,
                   cfg: FederationConfig) -> int:
    """Send the device its logits through the wire format; bytes down."""
    per = max(1, (cfg.max_payload - 4096) // (8 + 4 * hub.num_classes))
    down = 0
    for m in logits_messages(dev.device_id, rnd, ids.numpy(), z, per, cfg.logits_codec,
                             hub.held.epoch(dev.device_id)):
        down += len(m)
        chunk = parse_logits(wire.decode_message(m, max_bytes=4 * cfg.max_payload))
        dev.mirror.confirm(chunk.feature_epoch)
        dev.receive_logits(chunk.ids, chunk.logits)
    return down


def run_gkt(cfg: FederationConfig, setup: Setup, on_round: Progress | None = None) -> RunResult:
    ncls = setup.num_classes or cfg.data.num_classes
    names = device_names(cfg.devices)
    devices = make_devices(cfg, setup)
    hub = Hub(ncls, cfg.server, seed=cfg.seed)
    policy = RefreshPolicy.parse(cfg.refresh)
    test_loader = make_loader(setup.test.dataset, 256, shuffle=False)
    result = RunResult("gkt", cfg.data.dataset, cfg.devices, asdict(cfg),
                       codec=f"{cfg.codec} features, {cfg.logits_codec} logits, "
                             f"refresh {cfg.refresh}",
                       transport="inproc (every message encoded and decoded as on the wire)")
    for rnd in range(cfg.rounds):
        t0 = time.perf_counter()
        epochs, up, down = upload_round(hub, devices, rnd, cfg, policy)
        stats = hub.train(names)
        logits = {d: hub.logits_for(d) for d in names}
        hub.commit_features(names, epochs)
        for dev in devices:
            down += deliver_logits(hub, dev, rnd, *logits[dev.device_id], cfg)
        seconds = time.perf_counter() - t0  # evaluation is bookkeeping, not part of the round
        ev = hub.evaluate(test_loader)
        edge_acc = float(np.mean([d.local_accuracy(test_loader) for d in devices]))
        result.class_report = class_report(ev.confusion, setup.classes)
        rec = RoundRecord(rnd, ev.mean, up, down, round(seconds, 3), edge_acc, stats.loss,
                          per_class_accuracy=result.class_report["per_class_accuracy"])
        if cfg.state_dir:
            state = Path(cfg.state_dir)
            hub.save(state, hub.checkpoint_meta(rnd, cfg.data, ev.mean))
            for dev in devices:
                dev.progress.completed_round = rnd
                dev.save(state / "devices" / dev.device_id)
        result.rounds.append(rec)
        if on_round:
            on_round(rec)
    return result


def _train_ce(model: nn.Module, opt: torch.optim.Optimizer, loader, epochs: int) -> float:
    model.train()
    total = seen = 0
    for _ in range(epochs):
        for batch in loader:
            x, y = batch[0], batch[1]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
    return total / max(seen, 1)


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict:
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    out = {}
    for k, ref in states[0].items():
        avg = sum(wi * s[k].double() for wi, s in zip(w, states))
        out[k] = avg.to(ref.dtype) if ref.is_floating_point() else avg.round().to(ref.dtype)
    return out


def run_fedavg(cfg: FederationConfig, setup: Setup, on_round: Progress | None = None) -> RunResult:
    """Each device trains the whole ResNet-56 locally; the server averages by sample count."""
    torch.manual_seed(cfg.seed)
    ncls = setup.num_classes or cfg.data.num_classes
    global_model = FULL_MODELS[cfg.fedavg_model](ncls)
    loaders = [
        make_loader(WithIds(setup.train.dataset, ids), cfg.edge.batch_size, True, cfg.seed + i)
        for i, ids in enumerate(setup.shards)
    ]
    weights = [float(len(ids)) for ids in setup.shards]
    test_loader = make_loader(setup.test.dataset, 256, shuffle=False)
    result = RunResult("fedavg", cfg.data.dataset, cfg.devices, asdict(cfg),
                       evaluation="global averaged model on test data",
                       codec="fp32 weights (exact, zstd), one framed message each way per "
                             "device")
    names = device_names(cfg.devices)
    local = FULL_MODELS[cfg.fedavg_model](ncls)
    for rnd in range(cfg.rounds):
        t0 = time.perf_counter()
        states, losses = [], []
        down = sum(weights_wire_bytes(n, rnd, global_model.state_dict())
                   for n in names)  # the global model to every device
        for loader in loaders:
            local.load_state_dict(global_model.state_dict())
            opt = make_optimizer(local, cfg.edge.lr, cfg.edge.weight_decay)
            losses.append(_train_ce(local, opt, loader, cfg.edge.epochs))
            states.append({k: v.clone() for k, v in local.state_dict().items()})
        up = sum(weights_wire_bytes(n, rnd, s) for n, s in zip(names, states))
        global_model.load_state_dict(weighted_average(states, weights))
        seconds = time.perf_counter() - t0
        acc = accuracy(global_model, test_loader)
        rec = RoundRecord(rnd, acc, up, down,
                          round(seconds, 3), None, float(np.average(losses, weights=weights)))
        result.rounds.append(rec)
        if on_round:
            on_round(rec)
    return result


def run_centralized(
    cfg: FederationConfig, setup: Setup, on_round: Progress | None = None
) -> RunResult:
    """The whole model on all the training data in one place; one round = edge.epochs epochs."""
    torch.manual_seed(cfg.seed)
    ncls = setup.num_classes or cfg.data.num_classes
    model = FULL_MODELS[cfg.fedavg_model](ncls)
    all_ids = np.sort(np.concatenate(setup.shards))
    loader = make_loader(WithIds(setup.train.dataset, all_ids), cfg.edge.batch_size, True, cfg.seed)
    opt = make_optimizer(model, cfg.edge.lr, cfg.edge.weight_decay)
    test_loader = make_loader(setup.test.dataset, 256, shuffle=False)
    result = RunResult("centralized", cfg.data.dataset, cfg.devices, asdict(cfg),
                       evaluation="centrally trained model on test data")
    for rnd in range(cfg.rounds):
        t0 = time.perf_counter()
        loss = _train_ce(model, opt, loader, cfg.edge.epochs)
        seconds = time.perf_counter() - t0
        rec = RoundRecord(rnd, accuracy(model, test_loader), 0, 0, round(seconds, 3), None, loss)
        result.rounds.append(rec)
        if on_round:
            on_round(rec)
    return result


RUNNERS = {"gkt": run_gkt, "fedavg": run_fedavg, "centralized": run_centralized}
