"""The edge model of FedGKT ("ResNet-8") and the Bottleneck stages shared with the hub.

Blocks are torchvision's ``Bottleneck`` (stride on the 3x3 conv, expansion 4), which is
exactly the block of the FedGKT reference models, so parameter and FLOP counts match
the paper: edge 10,586 params and 9.618 M conv multiply-adds per 32x32 image (C=10).
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_CHANNELS = 16  # channels of H, the feature map a device sends to the hub


def conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """torchvision's ``models.resnet.Bottleneck`` (groups 1, base width 64), its module
    names and state-dict keys included. Written out here because importing torchvision
    costs a device ~160 MB of RSS with the CUDA wheel (docs/performance.md); tests check
    it against torchvision's."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def bottleneck_stage(inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """``blocks`` Bottlenecks of width ``planes``; the first one downsamples when needed."""
    downsample = None
    out = planes * Bottleneck.expansion
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    layers = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """Kaiming init for convs and unit BN, as the reference ResNets do."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FeatureExtractor(nn.Sequential):
    """3x3 conv 3->16 + BN + ReLU: 464 parameters. Its output H is what the hub sees."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, FEATURE_CHANNELS, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(FEATURE_CHANNELS),
            nn.ReLU(inplace=True),
        )


class GlobalAvgPool(nn.Module):
    """Mean over H and W, as a sum then a division: the same values as AdaptiveAvgPool2d(1).

    Why not AdaptiveAvgPool2d: its backward materialises a full-size NCHW gradient, which
    the channels-last ReLU before it then reads across strides; the sum's backward is a
    broadcast view instead. On the edge's 64x32x32 map that was ~15% of a training step
    (docs/performance.md). No parameters, so state dicts and counts are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(2, 3), keepdim=True) / (x.shape[-2] * x.shape[-1])


class EdgeResNet8(nn.Module):
    """Extractor + two width-16 Bottlenecks + pooled linear head. forward -> (logits, H)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.extractor = FeatureExtractor()
        self.body = bottleneck_stage(FEATURE_CHANNELS, 16, blocks=2)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(16 * Bottleneck.expansion, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.extractor(x)
        z = self.fc(torch.flatten(self.pool(self.body(h)), 1))
        return z, h


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
