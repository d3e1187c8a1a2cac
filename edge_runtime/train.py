"""The device's learning steps as plain functions: local training and feature extraction."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .distill import LogitBank, kd_loss


@dataclass(frozen=True)
class EdgeTrainConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 3.0
    alpha: float = 1.0  # weight of the KD term against the hub's logits


@dataclass(frozen=True)
class TrainStats:
    loss: float
    accuracy: float
    samples: int
    distilled: int  # samples that had a teacher logit


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, amsgrad=True)


def train_edge(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    teacher: LogitBank | None,
    cfg: EdgeTrainConfig,
) -> TrainStats:
    """CE(z_c, y) + alpha * KD_T(z_c || z_s[id]); CE only for samples with no teacher yet."""
    model.train()
    total_loss = correct = seen = distilled = 0
    for _ in range(cfg.epochs):
        for x, y, ids in loader:
            logits, _ = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None and len(teacher) and cfg.alpha > 0:
                z_s, mask = teacher.lookup(ids)
                if mask.any():
                    loss = loss + cfg.alpha * kd_loss(logits[mask], z_s[mask], cfg.temperature)
                    distilled += int(mask.sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    return TrainStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, distilled)


@dataclass(frozen=True)
class FeatureBatch:
    """What a device uploads for a batch of its samples, keyed by sample id."""

    ids: torch.Tensor  # int64 [k]
    features: torch.Tensor  # float32 [k, 16, S, S], post-ReLU
    logits: torch.Tensor  # float32 [k, C]
    labels: torch.Tensor  # int64 [k]


@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader) -> Iterator[FeatureBatch]:
    """Eval-mode pass over the (non-augmented) local set, one batch at a time."""
    model.eval()
    for x, y, ids in loader:
        logits, h = model(x)
        yield FeatureBatch(ids.long(), h.contiguous(), logits, y.long())


@torch.inference_mode()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of a model returning logits (or (logits, H)) on (x, y[, ids]) batches."""
    model.eval()
    correct = seen = 0
    for batch in loader:
        x, y = batch[0], batch[1]
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)
