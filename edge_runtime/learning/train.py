"""The device's learning steps as plain functions: local training and feature extraction."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from edge_runtime.learning.distill import LogitBank, kd_loss
from edge_runtime.learning.optimizer import AmsgradAdam
from edge_runtime.learning.perf import (
    autocast,
    channels_last_input,
    inference_copy,
    keep_freed_memory,
    resolve_precision,
    to_channels_last,
)
from edge_runtime.protocol.messages import FeatureBatch  # noqa: F401 (the device imports it here)

EXTRACT_BACKENDS = ("folded", "eager", "onnxruntime")


@dataclass(frozen=True)
class EdgeTrainConfig:
    """How a device trains its model each round (epochs, batch, optimizer, KD)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 3.0
    alpha: float = 1.0  # weight of the KD term against the hub's logits
    # CPU speed (docs/performance.md): NHWC model and batches; and, on glibc, keep freed
    # activation memory in the process (set once for the whole process by the first call).
    channels_last: bool = True
    reuse_memory: bool = True
    extract_backend: str = "folded"  # see extract_features
    # fp32 | bf16 | auto (bf16 where the CPU runs it natively): autocast for training and
    # torch extraction; opt-in since it changes results at bf16 rounding
    precision: str = "fp32"
    # the extractor keeps its weights and batch-norm statistics (refresh policy "freeze")
    freeze_extractor: bool = False

    def __post_init__(self) -> None:
        resolve_precision(self.precision)  # refuses unknown names now, not mid-round
        if self.extract_backend not in EXTRACT_BACKENDS:
            raise ValueError(f"unknown extraction backend {self.extract_backend!r}; "
                             f"choose from {list(EXTRACT_BACKENDS)}")


@dataclass(frozen=True)
class TrainStats:
    loss: float
    accuracy: float
    samples: int
    distilled: int  # samples that had a teacher logit


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> AmsgradAdam:
    """Adam with amsgrad, as the reference; not torch.optim's class, whose first use imports
    torch._dynamo (~150 MB of a device's RSS; edge_runtime/optimizer.py)."""
    return AmsgradAdam(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_edge(
    model: nn.Module,
    optimizer: AmsgradAdam | torch.optim.Optimizer,
    loader: DataLoader,
    teacher: LogitBank | None,
    cfg: EdgeTrainConfig,
) -> TrainStats:
    """CE(z_c, y) + alpha * KD_T(z_c || z_s[id]); CE only for samples with no teacher yet."""
    if cfg.reuse_memory:
        keep_freed_memory()
    if cfg.channels_last:
        to_channels_last(model)
    model.train()
    extractor = getattr(model, "extractor", None)
    if extractor is not None:
        extractor.requires_grad_(not cfg.freeze_extractor)
        if cfg.freeze_extractor:
            extractor.eval()  # batch norm would otherwise still move its running stats
    total_loss = correct = seen = distilled = 0
    for _ in range(cfg.epochs):
        for x, y, ids in loader:
            if cfg.channels_last:
                x = channels_last_input(x)
            with autocast(cfg.precision):
                logits, _ = model(x)
            logits = logits.float()  # losses in fp32 whatever the forward's precision
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


def extract_features(model: nn.Module, loader: DataLoader, backend: str = "folded",
                     precision: str = "fp32") -> Iterator[FeatureBatch]:
    """Eval-mode pass over the (non-augmented) local set, one batch at a time.

    backend: "folded" runs a copy with batch norm folded into the convolutions, in
    channels-last; "eager" runs ``model`` as it is; "onnxruntime" exports it first
    (``ort_extract``). Outputs agree up to float rounding (~1e-6); H is NCHW-contiguous,
    float32. ``precision`` "bf16" autocasts the torch backends (H then carries bf16
    rounding, ~4e-3 relative: finer than the q8 codec's steps).
    """
    if backend not in EXTRACT_BACKENDS:
        raise ValueError(f"unknown extraction backend {backend!r}; choose from "
                         f"{list(EXTRACT_BACKENDS)}")
    model.eval()
    if backend == "onnxruntime":
        from edge_runtime.learning.ort_extract import ort_extract_features

        return ort_extract_features(model, loader)
    return _torch_features(inference_copy(model) if backend == "folded" else model, loader,
                           channels_last=backend == "folded", precision=precision)


@torch.inference_mode()
def _torch_features(run: nn.Module, loader: DataLoader, channels_last: bool,
                    precision: str) -> Iterator[FeatureBatch]:
    for x, y, ids in loader:
        with autocast(precision):
            logits, h = run(channels_last_input(x) if channels_last else x)
        yield FeatureBatch(ids.long(), h.float().contiguous(), logits.float(), y.long())


EVAL_CHUNK = 64  # samples per forward pass in evaluation, whatever the loader's batch


@torch.inference_mode()
def accuracy(model: nn.Module, loader: DataLoader, chunk: int = EVAL_CHUNK) -> float:
    """Top-1 accuracy of a model returning logits (or (logits, H)) on (x, y[, ids]) batches.

    Runs a BN-folded channels-last copy, ``chunk`` samples at a time: a device evaluates on
    test batches of 256, whose forward pass alone lifted its peak RSS ~200 MB above
    training's at batch 64 (bench/bench_device_memory.py).
    """
    model.eval()
    run = inference_copy(model)
    correct = seen = 0
    for batch in loader:
        for x, y in zip(batch[0].split(chunk), batch[1].split(chunk)):
            out = run(channels_last_input(x))
            logits = out[0] if isinstance(out, tuple) else out
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    return correct / max(seen, 1)
