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
from edge_runtime.learning.data import DataConfig, Split, WithIds, load_split, make_loader
from edge_runtime.learning.partition import parse_partition, partition
from edge_runtime.learning.train import EdgeTrainConfig, accuracy, make_optimizer
from server_hub.feature_bank import DeviceFeatures
from server_hub.hub import Hub
from server_hub.models import FULL_MODELS
from server_hub.monitoring.results import RoundRecord, RunResult
from server_hub.run.evaluation import class_report
from server_hub.trainer import ServerTrainConfig

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

    def __post_init__(self) -> None:
        parse_partition(self.partition)
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


Progress = Callable[[RoundRecord], None]


def make_devices(cfg: FederationConfig, setup: Setup) -> list[EdgeDevice]:
    return [
        EdgeDevice(name, setup.train, setup.train_eval, ids,
                   setup.num_classes or cfg.data.num_classes, cfg.edge,
                   seed=cfg.seed + i, model_seed=cfg.seed)
        for i, (name, ids) in enumerate(zip(device_names(cfg.devices), setup.shards))
    ]


def run_gkt(cfg: FederationConfig, setup: Setup, on_round: Progress | None = None) -> RunResult:
    ncls = setup.num_classes or cfg.data.num_classes
    names = device_names(cfg.devices)
    devices = make_devices(cfg, setup)
    hub = Hub(ncls, cfg.server, seed=cfg.seed)
    test_loader = make_loader(setup.test.dataset, 256, shuffle=False)
    result = RunResult("gkt", cfg.data.dataset, cfg.devices, asdict(cfg))
    for rnd in range(cfg.rounds):
        t0 = time.perf_counter()
        hub.start_round()
        up = down = 0
        for dev in devices:
            dev.train()
            for b in dev.features():
                hub.receive_features(dev.device_id,
                                     DeviceFeatures(b.ids, b.features, b.logits, b.labels))
                up += raw_upload_bytes(len(b.ids), tuple(b.features.shape[1:]), ncls)
            state = dev.extractor_state()
            hub.receive_extractor(dev.device_id, state)
            up += state_bytes(state)
        stats = hub.train(names)
        for dev in devices:
            ids, logits = hub.logits_for(dev.device_id)
            dev.receive_logits(ids.numpy(), logits)
            down += raw_download_bytes(len(ids), ncls)
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
    model_bytes = state_bytes(global_model.state_dict())
    result = RunResult("fedavg", cfg.data.dataset, cfg.devices, asdict(cfg),
                       evaluation="global averaged model on test data")
    local = FULL_MODELS[cfg.fedavg_model](ncls)
    for rnd in range(cfg.rounds):
        t0 = time.perf_counter()
        states, losses = [], []
        for loader in loaders:
            local.load_state_dict(global_model.state_dict())
            opt = make_optimizer(local, cfg.edge.lr, cfg.edge.weight_decay)
            losses.append(_train_ce(local, opt, loader, cfg.edge.epochs))
            states.append({k: v.clone() for k, v in local.state_dict().items()})
        global_model.load_state_dict(weighted_average(states, weights))
        seconds = time.perf_counter() - t0
        acc = accuracy(global_model, test_loader)
        rec = RoundRecord(rnd, acc, model_bytes * cfg.devices, model_bytes * cfg.devices,
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
