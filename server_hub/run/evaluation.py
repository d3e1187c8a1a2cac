"""Extractor_k + server on held-out data as a confusion matrix, and what it says per class."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from server_hub.models import FullResNet


@torch.no_grad()
def split_confusion(extractor: nn.Module, server: nn.Module, loader,
                    num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class] of device k's extractor followed by the server."""
    dev = next(server.parameters()).device
    model = FullResNet(extractor.to(dev), server).eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for batch in loader:
        x, y = batch[0].to(dev), batch[1]
        pred = model(x).argmax(1).cpu()
        counts += torch.bincount(y.long() * num_classes + pred, minlength=num_classes ** 2)
    return counts.view(num_classes, num_classes).numpy()


def accuracy_of(confusion: np.ndarray) -> float:
    total = int(confusion.sum())
    return float(np.trace(confusion)) / total if total else 0.0


def per_class_accuracy(confusion: np.ndarray) -> list[float | None]:
    """Recall per true class; None for a class with no test image."""
    rows = confusion.sum(axis=1)
    return [round(float(confusion[i, i]) / r, 4) if r else None for i, r in enumerate(rows)]


def class_report(confusion: np.ndarray, classes: list[str] | None) -> dict:
    """JSON for the run file and the status page. ``confusion`` sums the devices' matrices
    (each device's extractor + the server on every test image), so its per-class accuracy
    is the mean over devices, like the headline metric."""
    n = confusion.shape[0]
    return {"classes": list(classes) if classes else [str(i) for i in range(n)],
            "per_class_accuracy": per_class_accuracy(confusion),
            "confusion": confusion.astype(int).tolist()}
