"""One edge device's GKT state and steps, independent of any transport.

The MQTT agent and the in-process simulator both drive this class, so the learning
logic is tested without a network.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from edge_runtime.device.refresh import FeatureMirror, extractor_digest
from edge_runtime.learning.data import Split, WithIds, make_loader
from edge_runtime.learning.distill import LogitBank
from edge_runtime.learning.models import EdgeResNet8
from edge_runtime.learning.train import (
    EdgeTrainConfig,
    FeatureBatch,
    TrainStats,
    accuracy,
    extract_features,
    make_optimizer,
    train_edge,
)


@dataclass
class DeviceProgress:
    device_id: str
    completed_round: int = -1  # last round whose logits were received
    last_stats: dict | None = None


class EdgeDevice:
    """A device's GKT state and steps without any transport: local data, the edge model
    (extractor + classifier), local training with the hub's logits, feature extraction."""

    def __init__(
        self,
        device_id: str,
        train_split: Split,
        train_eval_split: Split,
        sample_ids: np.ndarray,
        num_classes: int,
        cfg: EdgeTrainConfig,
        seed: int = 0,
        model_seed: int = 0,
        positions: np.ndarray | None = None,
        ids_may_change: bool = False,
    ) -> None:
        """``train_split`` may augment; ``train_eval_split`` is the same data, unaugmented.
        Sample ``sample_ids[i]`` is row ``positions[i]`` of both (default: the id is the
        row). ``ids_may_change``: the device's own data, where files come and go between
        rounds (``use_data``) and a saved state may hold other ids.

        Every device of a federation must start from the same weights (``model_seed``):
        the server model learns one feature space, and extractors that start apart stay
        apart (with per-device inits, digits accuracy plateaued near 0.68).
        """
        torch.manual_seed(model_seed)
        self.device_id = device_id
        self.cfg = cfg
        self.seed = seed
        self.ids_may_change = ids_may_change
        self.model = EdgeResNet8(num_classes)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay)
        self.bank = LogitBank(np.zeros(0, np.int64), num_classes)
        self.progress = DeviceProgress(device_id)
        self.mirror: FeatureMirror | None = None  # what the hub holds of our features
        torch.manual_seed(seed)
        self.use_data(train_split, train_eval_split, sample_ids, positions)

    def use_data(self, train_split: Split, train_eval_split: Split, sample_ids: np.ndarray,
                 positions: np.ndarray | None = None) -> None:
        """Train on these samples from now on; logits of ids no longer held are dropped."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        self.sample_ids = ids[order]
        if self.mirror is None or not np.array_equal(self.mirror.ids, self.sample_ids):
            # other samples than the hub's copy describes: start over with full maps
            self.mirror = FeatureMirror(self.sample_ids)
        rows = self.sample_ids if positions is None else np.asarray(positions, np.int64)[order]
        old, self.bank = self.bank, LogitBank(self.sample_ids, self.bank.num_classes)
        self.bank.rekey_from(old)
        self._train = make_loader(WithIds(train_split.dataset, self.sample_ids, rows),
                                  self.cfg.batch_size, shuffle=True, seed=self.seed)
        self._extract = make_loader(WithIds(train_eval_split.dataset, self.sample_ids, rows),
                                    self.cfg.batch_size, shuffle=False)

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    def train(self, freeze_extractor: bool = False) -> TrainStats:
        cfg = replace(self.cfg, freeze_extractor=True) if freeze_extractor else self.cfg
        stats = train_edge(self.model, self.optimizer, self._train, self.bank, cfg)
        self.progress.last_stats = asdict(stats)
        return stats

    def features(self) -> Iterator[FeatureBatch]:
        return extract_features(self.model, self._extract, self.cfg.extract_backend,
                                self.cfg.precision)

    def extractor_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.extractor.state_dict().items()}

    def extractor_digest(self) -> str:
        return extractor_digest(self.model.extractor.state_dict())

    def receive_logits(self, ids: np.ndarray, logits: torch.Tensor) -> None:
        self.bank.update(ids, logits)

    def local_accuracy(self, test_loader) -> float:
        return accuracy(self.model, test_loader)

    # A restarted device resumes from its state directory (local files it wrote itself).
    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({f"bank.{k}": v.contiguous() for k, v in self.bank.state().items()})
        _replace(state_dir / "edge.safetensors", lambda p: save_file(tensors, str(p)))
        _replace(state_dir / "optimizer.pt", lambda p: torch.save(self.optimizer.state_dict(), p))
        self.mirror.save(state_dir / "mirror")
        progress = json.dumps(asdict(self.progress), indent=1)
        _replace(state_dir / "progress.json", lambda p: p.write_text(progress))  # last: the mark

    def load(self, state_dir: Path) -> bool:
        """Restore from ``state_dir``; False if there is nothing saved there yet."""
        path = state_dir / "edge.safetensors"
        if not path.exists() or not (state_dir / "progress.json").exists():
            return False  # progress.json is written last: without it the first save never ended
        try:
            tensors = load_file(str(path))
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items()
                                        if k.startswith("model.")})
            self.bank.load_state({k[5:]: v for k, v in tensors.items() if k.startswith("bank.")},
                                 rekey=self.ids_may_change)
            opt = state_dir / "optimizer.pt"
            if opt.exists():
                self.optimizer.load_state_dict(torch.load(opt, weights_only=True))
            progress = json.loads((state_dir / "progress.json").read_text())
            self.progress = DeviceProgress(**progress)
            self.mirror.load(state_dir / "mirror")
            if not np.array_equal(self.mirror.ids, self.sample_ids):  # files changed since
                self.mirror = FeatureMirror(self.sample_ids)
        except (RuntimeError, ValueError, KeyError, TypeError, OSError) as err:
            detail = " ".join(str(err).split())[:300]
            raise DeviceStateError(
                f"{state_dir}: the saved device state does not fit this device ({detail}). "
                "It was saved for another model, dataset or number of classes, or is damaged: "
                "give another --state-dir, or delete this one to start afresh") from err
        return True


class DeviceStateError(ValueError):
    """A state directory that this device cannot resume from."""


def _replace(path: Path, write) -> None:
    """Write a temporary file, then rename it over ``path``: a device killed mid-save
    leaves the old file or the new one, never half of one that it could not resume from."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def load_edge_model_state(state_dir: Path) -> dict[str, torch.Tensor]:
    """The edge model's weights from a device state directory (``edge.safetensors``)."""
    tensors = load_file(str(Path(state_dir) / "edge.safetensors"))
    return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
