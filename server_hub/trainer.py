"""The hub's learning steps: train the server model on all devices' features, emit logits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from edge_runtime.learning.distill import kd_loss
from edge_runtime.learning.models import FeatureExtractor
from edge_runtime.learning.perf import (
    autocast,
    channels_last_input,
    keep_freed_memory,
    resolve_precision,
    to_channels_last,
)
from server_hub.feature_bank import FeatureBank
from server_hub.models import FullResNet


@dataclass(frozen=True)
class ServerTrainConfig:
    """How the hub trains the server model (model, epochs, optimizer, KD, speed)."""

    model: str = "resnet55"
    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 3.0
    alpha: float = 0.0  # weight of KD from the devices' logits (0 = CE only)
    device: str = "auto"  # auto | cpu | cuda
    # speed (docs/performance.md): NHWC model and batches; on glibc, keep freed memory
    channels_last: bool = True
    reuse_memory: bool = True
    # autocast on a CPU hub: fp32 | bf16 | auto (bf16 where the CPU runs it natively)
    cpu_precision: str = "fp32"
    # bf16 autocast on a CUDA hub: off, since on an H200 it trained ResNet-55 at 0.78x fp32's
    # samples/s at batch 64 (launch-bound) and 1.01-1.05x at 256 (bench/bench_hub_gpu.py)
    cuda_amp: bool = False

    def __post_init__(self) -> None:
        resolve_precision(self.cpu_precision)  # refuses unknown names at configuration

    @property
    def distils(self) -> bool:
        """Whether training reads the devices' logits (so they must upload them)."""
        return self.alpha > 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class ServerStats:
    """Loss and accuracy of a server training pass."""

    loss: float
    accuracy: float
    samples: int
    epochs: int


class NonFiniteTraining(ArithmeticError):
    """A training step produced a non-finite loss; the model must be put back."""


class Rows:
    """Several devices' feature tensors (memory-mapped ones included) indexed as one, a
    batch at a time: concatenating them would copy every device's features into RAM."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts
        self.starts = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        part = torch.searchsorted(self.starts[1:], idx, right=True)
        out = torch.empty((len(idx), *self.parts[0].shape[1:]), dtype=torch.float32)
        for k in part.unique().tolist():
            sel = part == k
            out[sel] = self.parts[k][idx[sel] - self.starts[k]].float()
        return out


def _gather(bank: FeatureBank, devices: list[str]):
    parts = [bank.get(d) for d in devices]
    return (
        Rows([p.features for p in parts]),
        torch.cat([p.logits for p in parts]).float(),
        torch.cat([p.labels for p in parts]),
    )


def server_autocast(cfg: ServerTrainConfig, dev: torch.device):
    """bf16 autocast of the server's forward pass: on a CUDA hub if ``cfg.cuda_amp``, on a
    CPU hub as ``cfg.cpu_precision`` says."""
    if dev.type == "cuda":
        amp = cfg.cuda_amp
    else:
        amp = resolve_precision(cfg.cpu_precision) == "bf16"
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp)


def server_step(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: ServerTrainConfig,
                hb: torch.Tensor, yb: torch.Tensor, z_c: torch.Tensor,
                weights: torch.Tensor | None = None,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of the server on a batch already on the model's device; (mean
    loss, logits), both detached. The loss is cross-entropy (each sample's scaled by
    ``weights``, async staleness) plus ``cfg.alpha`` x KD from the devices' logits ``z_c``;
    the gradient is that of ``scale`` x the loss (hub workers weight their share of a
    global batch). The single hub, the workers and async mode all train through here."""
    dev = hb.device
    if cfg.channels_last:
        hb = channels_last_input(hb)
    model.train()
    with server_autocast(cfg, dev):
        z_s = model(hb)
    z = z_s.float()
    if weights is None:
        loss = F.cross_entropy(z, yb)
        kd_weight = cfg.alpha
    else:
        loss = (weights * F.cross_entropy(z, yb, reduction="none")).mean()
        kd_weight = cfg.alpha * weights.mean()
    if cfg.distils:
        loss = loss + kd_weight * kd_loss(z, z_c, cfg.temperature)
    optimizer.zero_grad(set_to_none=True)
    (loss * scale if scale != 1.0 else loss).backward()
    optimizer.step()
    return loss.detach(), z_s.detach()


def train_server(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    bank: FeatureBank,
    devices: list[str],
    cfg: ServerTrainConfig,
    generator: torch.Generator,
) -> ServerStats:
    """``cfg.epochs`` passes over every sample of ``devices``, shuffled across devices."""
    dev = next(model.parameters()).device
    if cfg.reuse_memory:
        keep_freed_memory()
    if cfg.channels_last:
        to_channels_last(model)
    h, z_c, y = _gather(bank, devices)
    n = len(y)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels
    total = correct = seen = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            hb, yb = h[idx].to(dev, non_blocking=True), y[idx].to(dev, non_blocking=True)
            loss, z_s = server_step(model, optimizer, cfg, hb, yb, z_c[idx].to(dev))
            value = float(loss)  # syncs once per step, as the running total did
            if not math.isfinite(value):  # Hub.train puts the model and optimizer back
                raise NonFiniteTraining(f"loss {value} at step {seen // cfg.batch_size}")
            total += value * len(idx)
            correct += int((z_s.argmax(1) == yb).sum())
            seen += len(idx)
    return ServerStats(total / max(seen, 1), correct / max(seen, 1), n, cfg.epochs)


@torch.no_grad()
def probe_finite(model: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 256) -> bool:
    """Whether a train-mode forward pass over one device's features gives finite logits
    and loss (the caller restores BN statistics afterwards)."""
    dev = next(model.parameters()).device
    model.train()
    for i in range(0, len(features), batch_size):
        z = model(features[i : i + batch_size].float().to(dev))
        loss = F.cross_entropy(z, labels[i : i + batch_size].to(dev))
        if not (torch.isfinite(z).all() and torch.isfinite(loss)):
            return False
    return True


@torch.inference_mode()
def server_logits(model: nn.Module, features: torch.Tensor, batch_size: int = 256,
                  channels_last: bool = True, precision: str = "fp32") -> torch.Tensor:
    """Eval-mode logits for features, in the features' order (so ids stay paired).

    ``channels_last`` converts the batches only: converting the model's parameters here,
    under inference mode, would turn them into inference tensors that cannot train.
    ``precision`` "bf16" (or "auto") autocasts the forward pass; logits come back fp32.
    """
    dev = next(model.parameters()).device
    model.eval()
    outs = []
    for i in range(0, len(features), batch_size):
        x = features[i : i + batch_size].float().to(dev)
        with autocast(precision, dev.type):
            outs.append(model(channels_last_input(x) if channels_last else x).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def extractor_from_state(state: dict[str, torch.Tensor]) -> FeatureExtractor:
    ext = FeatureExtractor()
    ext.load_state_dict(state)
    return ext


@torch.inference_mode()
def split_accuracy(extractor: nn.Module, server: nn.Module, loader: DataLoader) -> float:
    """Device k's extractor followed by the server model, on (x, y) batches."""
    dev = next(server.parameters()).device
    model = FullResNet(extractor.to(dev), server).eval()
    correct = seen = 0
    for batch in loader:
        x, y = batch[0].to(dev), batch[1].to(dev)
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    return correct / max(seen, 1)
