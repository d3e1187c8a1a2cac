"""The hub's GKT state and steps, independent of any transport."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from edge_runtime.protocol.errors import WireError
from edge_runtime.protocol.messages import FeatureChunk
from server_hub.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from server_hub.feature_bank import DeviceFeatures, FeatureBank
from server_hub.models import build_server
from server_hub.run.evaluation import accuracy_of, split_confusion
from server_hub.trainer import (
    NonFiniteTraining,
    ServerStats,
    ServerTrainConfig,
    extractor_from_state,
    pick_device,
    probe_finite,
    server_logits,
    train_server,
)
from server_hub.uplink.held import HeldFeatures

log = logging.getLogger("gkt.hub")


@dataclass(frozen=True)
class Evaluation:
    """Test accuracy of extractor_k + server per device, and their mean (the paper's metric)."""

    per_device: dict[str, float]
    # [true, predicted] counts summed over the devices (server_hub/run/evaluation.py), when
    # this process evaluated them all itself
    confusion: np.ndarray | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_device.values()))) if self.per_device else 0.0


class Hub:
    """The hub's GKT state (server model, optimizer, feature bank, device extractors)
    and its steps: receive, train, logits per device, evaluate, save and restore."""

    def __init__(self, num_classes: int, cfg: ServerTrainConfig, seed: int = 0,
                 feature_dir: str | Path | None = None,
                 held_dir: str | Path | None = None) -> None:
        """``feature_dir``: spill received feature maps there (bounded hub memory);
        ``held_dir``: keep each device's latest maps there across rounds and restarts."""
        torch.manual_seed(seed)
        self.cfg = cfg
        self.num_classes = num_classes
        self.device = pick_device(cfg.device)
        self.model = build_server(cfg.model, num_classes).to(self.device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.bank = FeatureBank(feature_dir)
        self.extractors: dict[str, dict[str, torch.Tensor]] = {}
        self.quarantined: dict[str, str] = {}  # device -> why, from the last train()
        self.held = HeldFeatures(held_dir)

    def receive_features(self, device: str, chunk: DeviceFeatures) -> None:
        if chunk.logits.shape[1:] != (self.num_classes,):
            raise ValueError(f"device {device}: logits have {chunk.logits.shape[1:]} classes, "
                             f"expected {self.num_classes}")
        if int(chunk.labels.min()) < 0 or int(chunk.labels.max()) >= self.num_classes:
            raise ValueError(f"device {device}: labels outside [0, {self.num_classes})")
        self.bank.add(device, chunk)

    def receive_chunk(self, device: str, chunk: FeatureChunk) -> None:
        """A decoded feature chunk, its maps rebuilt on what the hub holds (Resync if it
        cannot be). A device leaves its logits out when the run spec says the hub does not
        distil from them (``device_logits``); they are kept as zeros, which nothing reads."""
        logits = chunk.logits
        if logits is None:
            if self.cfg.distils:
                raise WireError("schema", f"device {device}: its upload has no logits, but "
                                          f"this hub distils from them (server alpha "
                                          f"{self.cfg.alpha:g})")
            logits = torch.zeros(len(chunk.ids), self.num_classes)
        maps = self.held.reconstruct(device, chunk)
        self.receive_features(device, DeviceFeatures(chunk.ids, maps, logits, chunk.labels))

    def receive_extractor(self, device: str, state: dict[str, torch.Tensor]) -> None:
        extractor_from_state(state)  # validates names and shapes before we keep it
        self.extractors[device] = state

    def start_round(self) -> None:
        self.bank.clear()

    def train(self, devices: list[str]) -> ServerStats:
        """Train on ``devices``. If a step goes non-finite, the model, optimizer and shuffle
        generator are put back as they were, the devices whose features alone give
        non-finite outputs are dropped (``self.quarantined``) and the round is trained
        again without them; if no single device is to blame, the round trains on none."""
        self.quarantined = {}
        before = self._snapshot()
        try:
            return train_server(self.model, self.optimizer, self.bank, devices, self.cfg,
                                self.generator)
        except NonFiniteTraining as err:
            self._put_back(before)
            log.warning("training went non-finite (%s); model put back, probing %d devices",
                        err, len(devices))
        bad = [d for d in devices if not probe_finite(self.model, self.bank.get(d).features,
                                                      self.bank.get(d).labels)]
        self._put_back(before)
        self.quarantined = {d: "nonfinite_training" for d in (bad or devices)}
        keep = [d for d in devices if d not in self.quarantined]
        try:
            return train_server(self.model, self.optimizer, self.bank, keep, self.cfg,
                                self.generator) if keep else ServerStats(float("nan"), 0.0, 0, 0)
        except NonFiniteTraining:
            self._put_back(before)
            self.quarantined = {d: "nonfinite_training" for d in devices}
            return ServerStats(float("nan"), 0.0, 0, 0)

    def _snapshot(self) -> tuple:
        return (copy.deepcopy(self.model.state_dict()),
                copy.deepcopy(self.optimizer.state_dict()), self.generator.get_state())

    def _put_back(self, snap: tuple) -> None:
        model, opt, gen = snap
        self.model.load_state_dict(model)
        self.optimizer.load_state_dict(opt)
        self.generator.set_state(gen)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The random states a resumed run needs to repeat this one (shuffle order, torch)."""
        state = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        if "torch" in state:
            torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def commit_features(self, devices: list[str], epochs: dict[str, str | None]) -> None:
        """Hold the round's maps of ``devices`` (after their logits are computed)."""
        for d in devices:
            feats = self.bank.get(d)
            self.held.commit(d, feats.ids, feats.features, epochs.get(d))

    def logits_for(self, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, z_s) for every sample the device sent, computed in eval mode."""
        feats = self.bank.get(device)
        return feats.ids, server_logits(self.model, feats.features)

    def checkpoint_meta(self, round_: int, data_cfg, test_accuracy: float | None) -> dict:
        mean, std = data_cfg.normalization
        return {
            "round": round_,
            "dataset": data_cfg.dataset,
            "num_classes": self.num_classes,
            "image_size": data_cfg.size,
            "normalization": {"mean": list(mean), "std": list(std)},
            "server_model": self.cfg.model,
            "devices": sorted(self.extractors),
            "test_accuracy": test_accuracy,
        }

    def save(self, state_dir: Path, meta: dict) -> Path:
        return save_checkpoint(state_dir, meta, self.model.state_dict(), self.extractors,
                               self.optimizer.state_dict(), rng=self.rng_state())

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.server)
        self.extractors = dict(ckpt.extractors)
        opt = load_optimizer_state(ckpt.path)
        if opt is not None:
            self.optimizer.load_state_dict(opt)
        self.set_rng_state(ckpt.rng)

    def resume(self, state_dir: Path) -> int:
        """Restore the newest checkpoint under ``state_dir``; the round to start at."""
        found = latest_checkpoint(state_dir)
        if found is None:
            return 0
        ckpt = load_checkpoint(found)
        self.restore(ckpt)
        logging.getLogger("gkt.hub").info("resumed from %s (round %d)", found, ckpt.round)
        return ckpt.round + 1

    def evaluate(self, test_loader: DataLoader, devices: list[str] | None = None) -> Evaluation:
        devices = devices if devices is not None else sorted(self.extractors)
        per_device, total = {}, np.zeros((self.num_classes, self.num_classes), np.int64)
        for d in devices:
            if d in self.extractors:
                cm = split_confusion(extractor_from_state(self.extractors[d]), self.model,
                                     test_loader, self.num_classes)
                per_device[d], total = accuracy_of(cm), total + cm
        return Evaluation(per_device, total if per_device else None)
