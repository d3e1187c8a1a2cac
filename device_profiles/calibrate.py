"""``gkt-profile calibrate``: how much of this machine's peak the real training step gets.

FLOP/s peaks badly predict tiny CNNs (ResNet-8's convs have 16-64 channels). We time
the device's own training step (``edge_runtime.learning.train.train_edge``: Adam/amsgrad, CE + KD
loss, a DataLoader) and a large matmul, and store

    efficiency = training FLOPs per step / step time / peak FLOP/s of this machine

per model and batch size (``calibration.Calibration``). The peak here is an estimate from
the CPU flags and clock (raised to the matmul throughput if that is higher); the
efficiency is only as portable as that. Calibrate on an idle machine.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from device_profiles.calibration import Calibration, CalibrationPoint
from device_profiles.catalog import DeviceSpec, Quantity
from device_profiles.model_zoo import get_model, train_flops_per_sample
from device_profiles.this_machine import cpu_model, this_machine
from edge_runtime.learning.distill import LogitBank
from edge_runtime.learning.train import EdgeTrainConfig, make_optimizer, train_edge


class LogitsAndInput(nn.Module):
    """Adapts a logits-only model (FedAvg's) to train_edge's (logits, H) interface."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(x), x


def fingerprint() -> tuple[str, str, int]:
    """(cpu model, arch, threads) that a calibration belongs to."""
    return cpu_model(), platform.machine(), torch.get_num_threads()


def matches_this_machine(cal: Calibration) -> bool:
    return (cal.machine, cal.arch, cal.threads) == fingerprint()


def calibrated_this_machine(cal: Calibration | None) -> DeviceSpec:
    """This machine as a device; with a calibration made here, its peak is the very peak
    the efficiency was computed against, so predictions reproduce the measured step."""
    spec = this_machine(matmul_gflops=cal.matmul_gflops if cal else None,
                        threads=torch.get_num_threads())
    if cal is not None and matches_this_machine(cal):
        spec = replace(spec, cpu_peak_gflops=Quantity(cal.peak_gflops, cal.peak_source))
    return spec


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best of ``repeats`` n x n fp32 matmuls: the achievable dense peak (2 flops per MAC)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def time_training_steps(model_name: str, batch: int, steps: int, warmup: int = 3,
                        num_classes: int = 10, image_size: int = 32) -> float:
    """Mean wall seconds per step of the device's real training loop (CE + KD, amsgrad)."""
    entry = get_model(model_name)
    torch.manual_seed(0)
    model = entry.build(num_classes)
    if entry.role != "edge":  # train_edge wants (logits, H); FedAvg trains with CE only
        model = LogitsAndInput(model)
    cfg = EdgeTrainConfig(batch_size=batch)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)

    def loader(n_steps: int) -> DataLoader:
        n = n_steps * batch
        ds = TensorDataset(torch.randn(n, entry.input_channels, image_size, image_size),
                           torch.randint(0, num_classes, (n,)), torch.arange(n))
        return DataLoader(ds, batch_size=batch, shuffle=True)

    ids = np.arange(steps * batch)
    teacher = None
    if entry.role == "edge":  # GKT rounds >= 1 distill from the hub's logits
        teacher = LogitBank(ids, num_classes)
        teacher.update(ids, torch.randn(len(ids), num_classes))
    train_edge(model, opt, loader(warmup), None, cfg)
    timed = loader(steps)
    t0 = time.perf_counter()
    train_edge(model, opt, timed, teacher, cfg)
    return (time.perf_counter() - t0) / steps


def calibrate(models: tuple[str, ...] = ("resnet8",), batches: tuple[int, ...] = (64,),
              steps: int = 20, num_classes: int = 10, image_size: int = 32,
              progress: Callable[[str], None] = lambda _m: None) -> Calibration:
    """Measure the matmul peak and every (model, batch) training step on this machine."""
    progress("large matmul (2048 x 2048, fp32)")
    mm = matmul_gflops()
    spec = this_machine(matmul_gflops=mm, threads=torch.get_num_threads())
    peak = spec.cpu_peak_gflops
    points = []
    for name in models:
        per_sample = train_flops_per_sample(name, num_classes, image_size)
        for batch in batches:
            progress(f"{name}: {steps} training steps at batch {batch}")
            step_s = time_training_steps(name, batch, steps, num_classes=num_classes,
                                         image_size=image_size)
            flops = per_sample * batch
            achieved = flops / step_s / 1e9
            points.append(CalibrationPoint(name, batch, steps, step_s, flops, achieved,
                                           achieved / peak.value))
    machine, arch, threads = fingerprint()
    return Calibration(machine=machine, arch=arch, threads=threads,
                       torch_version=torch.__version__,
                       created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       peak_gflops=peak.value, peak_source=peak.source, matmul_gflops=mm,
                       points=points)
