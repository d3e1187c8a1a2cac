"""Per-device estimates: memory, largest batch, time per epoch and round, energy, bytes.

Pure functions of plain numbers (torch-free), so every formula is unit-tested:

    torch   = model states (weights, grads, 3 amsgrad Adam buffers: 5 x fp32 params)
              + batch x (input + activations saved for backward + 2 x largest output)
    memory  = OS + runtime (python + torch [+ CUDA]) + dataset (uint8 images)
              + torch + process overhead (WORKSPACE + (MALLOC_FACTOR - 1) x torch)
    epoch   = samples x training FLOPs per sample / (peak FLOP/s x efficiency)
    round   = epochs x epoch + feature extraction (forward pass over the samples)
              + upload + download at ``link_mbps``      (the hub's own time not included)
    energy  = power under load x epoch time

"2 x largest output" is the gradient buffers alive at once during backward (the
gradient of a layer's output and of its input); with saved activations this matched
torch's allocator peak within 1% on ResNet-8 (bench/bench_profile.py). The process grows
by more than torch's peak: malloc keeps freed blocks and oneDNN/OpenMP allocate
workspaces on first use; the two overhead constants below are a fit of measured RSS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from device_profiles.catalog import DeviceSpec, Quantity

MIB = 2**20
GIB = 2**30
OPTIMIZER_STATE_COPIES = 3  # Adam with amsgrad: exp_avg, exp_avg_sq, max_exp_avg_sq
DATASET_BYTES_PER_SAMPLE = 3 * 32 * 32  # images kept as uint8 (CIFAR layout), scaled by S
# RSS growth while training ~= WORKSPACE + MALLOC_FACTOR x torch's peak: least-squares fit
# of measured ResNet-8 training at batch 16/64/256 (x86_64, glibc, torch 2.14), see
# bench/bench_profile.py, which re-measures both.
PROCESS_WORKSPACE = Quantity(50 * MIB, "estimate: fit of measured RSS growth on x86_64")
MALLOC_FACTOR = Quantity(1.3, "estimate: fit of measured RSS growth on x86_64")
DEFAULT_CPU_EFFICIENCY = Quantity(
    0.10, "estimate: tiny CNN training typically reaches ~5-20% of a CPU's fp32 peak; "
          "not measured - run `gkt-profile calibrate`")


@dataclass(frozen=True)
class ModelCost:
    """What the estimator needs to know about a model, per sample (fp32)."""

    name: str
    params: int
    train_flops_per_sample: int  # forward + backward, 2 flops per multiply-add
    forward_flops_per_sample: int  # forward only, 2 flops per multiply-add
    input_bytes_per_sample: int
    saved_per_sample: int  # activations autograd keeps for backward
    saved_fixed: int
    largest_output_per_sample: int
    image_size: int = 32

    @property
    def param_bytes(self) -> int:
        return 4 * self.params

    @property
    def model_state_bytes(self) -> int:
        return self.param_bytes * (2 + OPTIMIZER_STATE_COPIES)

    @property
    def batch_bytes_per_sample(self) -> int:
        return (self.input_bytes_per_sample + self.saved_per_sample
                + 2 * self.largest_output_per_sample)

    def training_bytes(self, batch: int) -> int:
        """Predicted peak of torch memory while training at ``batch``."""
        return self.model_state_bytes + self.saved_fixed + batch * self.batch_bytes_per_sample


@dataclass(frozen=True)
class Settings:
    batch: int = 64
    samples: int = 6250  # CIFAR-10's 50,000 training images over the paper's 8 devices
    epochs: int = 1  # local epochs per round (E_c)
    codec: str = "fp32"
    link_mbps: float = 20.0  # the device's network link, both directions

    def __post_init__(self) -> None:
        for name in ("batch", "samples", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.link_mbps > 0:
            raise ValueError(f"link_mbps must be > 0, got {self.link_mbps}")


@dataclass(frozen=True)
class Efficiency:
    """Achieved / peak FLOP/s for a model's training step, and where that number came from."""

    value: float
    how: str
    measured_on: str = ""  # arch of the machine it was measured on ("" = not measured)


@dataclass(frozen=True)
class MemoryBreakdown:
    os: int
    runtime: int  # python + torch (+ CUDA context on a GPU)
    dataset: int
    model_states: int
    batch: int  # activations, gradients of activations, input
    overhead: int  # malloc's retained blocks, oneDNN/OpenMP workspaces
    ram: int

    @property
    def total(self) -> int:
        return (self.os + self.runtime + self.dataset + self.model_states + self.batch
                + self.overhead)

    @property
    def fits(self) -> bool:
        return self.total <= self.ram


@dataclass(frozen=True)
class DeviceEstimate:
    device: str
    name: str
    model: str
    target: str  # "cpu" or "gpu"
    samples: int
    memory: MemoryBreakdown
    largest_batch: int  # 0: not even one sample fits
    peak_gflops: float
    efficiency: float
    epoch_seconds: float
    round_seconds: float
    extract_seconds: float
    transfer_seconds: float
    bytes_up: int  # per round
    bytes_down: int
    energy_epoch_j: float | None
    price_usd: float | None
    trust: str
    how: list[str]
    estimated_fields: list[str]  # catalog numbers used that are estimates

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def samples_per_second(self) -> float:
        return 0.0 if self.epoch_seconds <= 0 else self.samples / self.epoch_seconds


def runtime_bytes(spec: DeviceSpec, measured_runtime: int, target: str) -> int:
    base = spec.runtime_mib.value * MIB if spec.runtime_mib else measured_runtime
    if target == "gpu" and spec.gpu_runtime_mib:
        base += spec.gpu_runtime_mib.value * MIB
    return int(base)


def predicted_rss_growth(cost: ModelCost, batch: int) -> int:
    """How much a training process grows beyond its imports (torch peak + overhead)."""
    torch_bytes = cost.training_bytes(batch)
    return int(PROCESS_WORKSPACE.value + MALLOC_FACTOR.value * torch_bytes)


def memory_breakdown(spec: DeviceSpec, cost: ModelCost, batch: int, samples: int,
                     runtime: int) -> MemoryBreakdown:
    per_image = DATASET_BYTES_PER_SAMPLE * (cost.image_size / 32) ** 2
    torch_bytes = cost.training_bytes(batch)
    return MemoryBreakdown(
        os=int(spec.os_mib.value * MIB), runtime=runtime, dataset=int(samples * per_image),
        model_states=cost.model_state_bytes, batch=torch_bytes - cost.model_state_bytes,
        overhead=int(PROCESS_WORKSPACE.value + (MALLOC_FACTOR.value - 1) * torch_bytes),
        ram=int(spec.ram_gib.value * GIB))


def largest_batch(spec: DeviceSpec, cost: ModelCost, samples: int, runtime: int) -> int:
    """Largest batch whose training fits in RAM (capped at ``samples``); 0 if none does."""
    base = memory_breakdown(spec, cost, 0, samples, runtime)
    per_sample = cost.batch_bytes_per_sample * MALLOC_FACTOR.value
    free = base.ram - base.total
    if free < per_sample:
        return 0
    return min(samples, int(free // per_sample))


def trust(spec: DeviceSpec, target: str, eff: Efficiency, is_this_machine: bool) -> str:
    """How far to trust a time estimate, in words a buyer can use."""
    if target == "gpu":
        return "factor 2: GPU efficiency is a catalog estimate, not measured"
    if not eff.measured_on:
        return "factor 3: default CPU efficiency; run `gkt-profile calibrate`"
    if is_this_machine:
        return "+-25%: calibrated on this machine (shared CPUs add noise)"
    if spec.arch == eff.measured_on:
        return (f"+-35%: CPU efficiency measured on {eff.measured_on} applied to another "
                f"{spec.arch} CPU")
    return f"+-50%: CPU efficiency measured on {eff.measured_on} applied to {spec.arch}"


def estimate(spec: DeviceSpec, cost: ModelCost, settings: Settings, eff: Efficiency,
             target: str, measured_runtime: int, bytes_up: int, bytes_down: int,
             is_this_machine: bool = False) -> DeviceEstimate:
    """Everything for ``cost`` trained on ``spec``'s CPU or GPU with ``settings``.
    ``bytes_up``/``bytes_down`` are one round's traffic (GKT features or FedAvg weights)."""
    if target not in ("cpu", "gpu"):
        raise ValueError(f"target must be cpu or gpu, got {target!r}")
    if target == "gpu" and spec.gpu_peak_gflops is None:
        raise ValueError(f"{spec.id} has no GPU in the catalog")
    peak = spec.gpu_peak_gflops if target == "gpu" else spec.cpu_peak_gflops
    assert peak is not None
    runtime = runtime_bytes(spec, measured_runtime, target)
    mem = memory_breakdown(spec, cost, settings.batch, settings.samples, runtime)
    flops_per_s = peak.value * 1e9 * eff.value
    epoch = settings.samples * cost.train_flops_per_sample / flops_per_s
    extract = settings.samples * cost.forward_flops_per_sample / flops_per_s
    transfer = (bytes_up + bytes_down) * 8 / (settings.link_mbps * 1e6)
    used = ["ram_gib", "os_mib", "gpu_peak_gflops" if target == "gpu" else "cpu_peak_gflops"]
    if spec.power_w:
        used.append("power_w")
    if target == "gpu":
        used += ["gpu_efficiency", "gpu_runtime_mib"]
    if spec.runtime_mib:
        used.append("runtime_mib")
    quantities = spec.quantities()
    how = [
        f"time = {settings.samples} samples x {cost.train_flops_per_sample / 1e6:.1f} MFLOP "
        f"(fwd+bwd, 2 flops/MAC) / ({peak.value:.0f} GFLOP/s peak x {eff.value:.3f} "
        f"efficiency)",
        f"efficiency: {eff.how}",
        f"peak: {peak.source}",
    ]
    return DeviceEstimate(
        device=spec.id, name=spec.name, model=cost.name, target=target,
        samples=settings.samples, memory=mem,
        largest_batch=largest_batch(spec, cost, settings.samples, runtime),
        peak_gflops=peak.value, efficiency=eff.value, epoch_seconds=epoch,
        round_seconds=settings.epochs * epoch + extract + transfer, extract_seconds=extract,
        transfer_seconds=transfer, bytes_up=bytes_up, bytes_down=bytes_down,
        energy_epoch_j=spec.power_w.value * epoch if spec.power_w else None,
        price_usd=spec.price_usd.value if spec.price_usd else None,
        trust=trust(spec, target, eff, is_this_machine), how=how,
        estimated_fields=[f for f in used if f in quantities and quantities[f].estimate],
    )


def gpu_efficiency(spec: DeviceSpec) -> Efficiency:
    assert spec.gpu_efficiency is not None
    return Efficiency(spec.gpu_efficiency.value, spec.gpu_efficiency.source)


def value_per_dollar(est: DeviceEstimate) -> float | None:
    """Training samples per second per 100 USD of hardware."""
    if not est.price_usd or not est.fits or est.epoch_seconds <= 0:
        return None
    return est.samples_per_second / est.price_usd * 100


def samples_per_joule(est: DeviceEstimate) -> float | None:
    if not est.energy_epoch_j or not est.fits:
        return None
    return est.samples / est.energy_epoch_j


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "n/a"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"
