"""The toolkit's models by name, and their profiles: parameters, FLOPs, activation memory.

Edge ResNet-8 runs on the device under GKT; the server ResNet-55/109 run on the hub over
H (16 channels); the FedAvg baselines ResNet-56/110 are what a device would train without
GKT. Every FLOP figure carries its convention (see ``flops``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from device_profiles.estimate import ModelCost
from device_profiles.flops import (
    FVCORE_CONVENTION,
    TORCH_CONVENTION,
    forward_flops,
    forward_flops_torch,
    training_step_flops,
)
from device_profiles.memory import ActivationMemory, saved_activations
from edge_runtime.learning.models import FEATURE_CHANNELS, EdgeResNet8, count_parameters
from server_hub.models import resnet55_server, resnet56, resnet109_server, resnet110


@dataclass(frozen=True)
class ModelEntry:
    name: str
    title: str
    role: str  # "edge" (GKT device), "server" (GKT hub), "fedavg" (whole model on a device)
    input_channels: int
    build: Callable[[int], nn.Module]


MODELS: dict[str, ModelEntry] = {e.name: e for e in (
    ModelEntry("resnet8", "ResNet-8 (GKT edge)", "edge", 3, EdgeResNet8),
    ModelEntry("resnet55", "ResNet-55 (GKT server)", "server", FEATURE_CHANNELS, resnet55_server),
    ModelEntry("resnet109", "ResNet-109 (GKT server)", "server", FEATURE_CHANNELS,
               resnet109_server),
    ModelEntry("resnet56", "ResNet-56 (FedAvg)", "fedavg", 3, resnet56),
    ModelEntry("resnet110", "ResNet-110 (FedAvg)", "fedavg", 3, resnet110),
)}


def get_model(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


@dataclass(frozen=True)
class ModelProfile:
    """Per-sample costs of one model at one input size (fp32 everywhere)."""

    name: str
    title: str
    role: str
    num_classes: int
    input_shape: tuple[int, int, int]  # one sample, C x S x S
    params: int
    forward_macs: int  # fvcore total (convs, linear, BN, pooling); 1 flop = 1 multiply-add
    forward_macs_by_operator: dict[str, int]
    forward_macs_by_module: dict[str, int]
    train_flops_per_sample: int  # FlopCounterMode fwd + bwd, 2 flops per multiply-add
    forward_flops_per_sample: int  # FlopCounterMode forward only, 2 flops per multiply-add
    activations: ActivationMemory
    conventions: dict[str, str] = field(default_factory=lambda: {
        "forward_macs": FVCORE_CONVENTION,
        "train_flops_per_sample": TORCH_CONVENTION,
        "forward_flops_per_sample": "torch FlopCounterMode: 2 flops per multiply-add, forward",
    })

    @property
    def param_bytes(self) -> int:
        return 4 * self.params

    @property
    def input_bytes_per_sample(self) -> int:
        c, h, w = self.input_shape
        return 4 * c * h * w

    @property
    def conv_linear_macs(self) -> int:
        ops = self.forward_macs_by_operator
        return ops.get("conv", 0) + ops.get("linear", 0)

    def cost(self) -> ModelCost:
        a = self.activations
        return ModelCost(self.name, self.params, self.train_flops_per_sample,
                         self.forward_flops_per_sample, self.input_bytes_per_sample,
                         a.saved_per_sample, a.saved_fixed, a.largest_output_per_sample,
                         self.input_shape[-1])


def meta_model(name: str, num_classes: int = 10) -> nn.Module:
    """``name`` built on the meta device: shapes only, so counting is fast and free."""
    with torch.device("meta"):
        return get_model(name).build(num_classes)


def train_flops_per_sample(name: str, num_classes: int = 10, image_size: int = 32) -> int:
    """FlopCounterMode's forward + backward FLOPs per sample (2 per multiply-add)."""
    # batch 2: BN in train mode needs more than one value per channel
    x = torch.empty(2, get_model(name).input_channels, image_size, image_size, device="meta")
    return training_step_flops(meta_model(name, num_classes), x, num_classes) // 2


def profile_model(name: str, num_classes: int = 10, image_size: int = 32,
                  module_depth: int = 2) -> ModelProfile:
    """Count everything for ``name`` on a freshly built model (a few seconds for ResNet-110)."""
    entry = get_model(name)
    torch.manual_seed(0)
    model = entry.build(num_classes)
    shape = (entry.input_channels, image_size, image_size)
    fwd = forward_flops(model, torch.zeros(1, *shape), module_depth=module_depth)
    # FlopCounterMode and the saved-tensor hooks only need shapes: meta tensors are ~10x
    # faster than real ones
    meta = meta_model(name, num_classes)
    train = train_flops_per_sample(name, num_classes, image_size)
    fwd_torch = forward_flops_torch(meta, torch.empty(2, *shape, device="meta")) // 2
    acts = saved_activations(meta, shape, num_classes)
    return ModelProfile(
        name=entry.name, title=entry.title, role=entry.role, num_classes=num_classes,
        input_shape=shape, params=count_parameters(model), forward_macs=fwd.total,
        forward_macs_by_operator=fwd.by_operator, forward_macs_by_module=fwd.by_module,
        train_flops_per_sample=train, forward_flops_per_sample=fwd_torch, activations=acts,
    )
