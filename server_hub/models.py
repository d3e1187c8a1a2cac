"""Server CNNs of FedGKT and the FedAvg baselines, built from the edge's Bottleneck stages.

Server ResNet-55/109 take H (16 channels) and run three Bottleneck stages, planes
16/32/64, strides 1/2/2. Adding the edge's 3->16 stem gives the FedAvg baselines
ResNet-56/110 (the whole network a device would train without GKT).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from edge_runtime.learning.models import (
    FEATURE_CHANNELS,
    EdgeResNet8,
    FeatureExtractor,
    bottleneck_stage,
    init_weights,
)


class ServerResNet(nn.Module):
    """Bottleneck ResNet over H: stages ``depths`` with planes 16/32/64 -> Linear(256, C)."""

    def __init__(self, depths: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.layer1 = bottleneck_stage(FEATURE_CHANNELS, 16, depths[0], stride=1)
        self.layer2 = bottleneck_stage(16 * Bottleneck.expansion, 32, depths[1], stride=2)
        self.layer3 = bottleneck_stage(32 * Bottleneck.expansion, 64, depths[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * Bottleneck.expansion, num_classes)
        init_weights(self)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(torch.flatten(self.pool(x), 1))


class FullResNet(nn.Module):
    """Extractor followed by a server network: FedAvg's whole model, or device k + hub."""

    def __init__(self, extractor: nn.Module, server: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.server = server

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.server(self.extractor(x))


def resnet55_server(num_classes: int = 10) -> ServerResNet:
    return ServerResNet((6, 6, 6), num_classes)


def resnet109_server(num_classes: int = 10) -> ServerResNet:
    return ServerResNet((12, 12, 12), num_classes)


def resnet56(num_classes: int = 10) -> FullResNet:
    model = FullResNet(FeatureExtractor(), resnet55_server(num_classes))
    init_weights(model.extractor)
    return model


def resnet110(num_classes: int = 10) -> FullResNet:
    model = FullResNet(FeatureExtractor(), resnet109_server(num_classes))
    init_weights(model.extractor)
    return model


SERVER_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet55": resnet55_server,
    "resnet109": resnet109_server,
}
FULL_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": EdgeResNet8,
    "resnet56": resnet56,
    "resnet110": resnet110,
}


def build_server(name: str, num_classes: int) -> nn.Module:
    try:
        return SERVER_MODELS[name](num_classes)
    except KeyError:
        raise ValueError(
            f"unknown server model {name!r}; choose from {sorted(SERVER_MODELS)}") from None
