"""The PyTorch modules that become ONNX graphs, built from a hub checkpoint and device states.

Four kinds of graph:

- ``edge``: a device's whole ResNet-8 (its extractor and local classifier). Exported with
  the logits as its only output: that is what on-device inference consumes, and split
  inference has its own graph for H (the ``extractor``; it is ~5% of the edge's cost).
- ``extractor``: device k's 3->16 stem, image -> H (split inference, device side).
- ``server``: the hub's server network, H -> logits (split inference, hub side).
- ``composed``: extractor_k followed by the server as one graph, image -> logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edge_runtime.device.edge_device import load_edge_model_state
from edge_runtime.learning.models import FEATURE_CHANNELS, EdgeResNet8, FeatureExtractor
from server_hub.checkpoint import Checkpoint
from server_hub.models import FullResNet, build_server

KINDS = ("edge", "extractor", "server", "composed")
CLASSIFIERS = ("edge", "server", "composed")  # graphs whose output is class logits
IMAGE_INPUT = ("edge", "extractor", "composed")  # graphs fed with images (vs features H)


class EdgeLogits(nn.Module):
    """EdgeResNet8 with its logits as the only output (forward of the model is (logits, H))."""

    def __init__(self, model: EdgeResNet8) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


@dataclass
class GraphSpec:
    """One graph to export: its module (in eval mode), what it takes and gives, its origin."""

    name: str  # file stem, e.g. "composed_dev0"
    kind: str
    module: nn.Module
    input_name: str
    output_name: str
    input_shape: tuple[int, int, int]  # per sample (C, S, S); the batch axis is dynamic
    device: str | None  # which device's weights; None for the server
    round: int | None  # training round the weights come from

    @property
    def is_classifier(self) -> bool:
        return self.kind in CLASSIFIERS


@dataclass(frozen=True)
class EdgeState:
    """A device's saved edge model (from its state directory) and the round it completed."""

    device: str
    state: dict[str, torch.Tensor]
    round: int | None


def load_edge_state(state_dir: Path) -> EdgeState:
    """Read ``edge.safetensors`` and, if present, ``progress.json`` from a device state dir."""
    state_dir = Path(state_dir)
    if not (state_dir / "edge.safetensors").exists():
        raise FileNotFoundError(f"no edge model in {state_dir} (expected edge.safetensors)")
    device, rnd = state_dir.name, None
    progress = state_dir / "progress.json"
    if progress.exists():
        info = json.loads(progress.read_text())
        device = info.get("device_id", device)
        rnd = info.get("completed_round")
    return EdgeState(device, load_edge_model_state(state_dir), rnd)


def image_shape(meta: dict) -> tuple[int, int, int]:
    size = int(meta["image_size"])
    return (3, size, size)


def feature_shape(meta: dict) -> tuple[int, int, int]:
    size = int(meta["image_size"])  # the extractor keeps the spatial size (stride 1, pad 1)
    return (FEATURE_CHANNELS, size, size)


def extractor_module(ckpt: Checkpoint, device: str) -> FeatureExtractor:
    if device not in ckpt.extractors:
        raise KeyError(f"device {device!r} not in checkpoint {ckpt.path}; it has "
                       f"{sorted(ckpt.extractors)}")
    ext = FeatureExtractor()
    ext.load_state_dict(ckpt.extractors[device])
    return ext.eval()


def server_module(ckpt: Checkpoint) -> nn.Module:
    server = build_server(ckpt.meta["server_model"], int(ckpt.meta["num_classes"]))
    server.load_state_dict(ckpt.server)
    return server.eval()


def edge_spec(edge: EdgeState, meta: dict) -> GraphSpec:
    model = EdgeResNet8(int(meta["num_classes"]))
    model.load_state_dict(edge.state)
    return GraphSpec(f"edge_{edge.device}", "edge", EdgeLogits(model).eval(), "image", "logits",
                     image_shape(meta), edge.device, edge.round)


def extractor_spec(ckpt: Checkpoint, device: str) -> GraphSpec:
    return GraphSpec(f"extractor_{device}", "extractor", extractor_module(ckpt, device), "image",
                     "features", image_shape(ckpt.meta), device, ckpt.round)


def server_spec(ckpt: Checkpoint) -> GraphSpec:
    return GraphSpec("server", "server", server_module(ckpt), "features", "logits",
                     feature_shape(ckpt.meta), None, ckpt.round)


def composed_spec(ckpt: Checkpoint, device: str) -> GraphSpec:
    model = FullResNet(extractor_module(ckpt, device), server_module(ckpt)).eval()
    return GraphSpec(f"composed_{device}", "composed", model, "image", "logits",
                     image_shape(ckpt.meta), device, ckpt.round)


def build_specs(ckpt: Checkpoint, devices: list[str], edges: list[EdgeState]) -> list[GraphSpec]:
    """Edge graphs first, then per device extractor and composed, and the server once."""
    specs = [edge_spec(e, ckpt.meta) for e in edges]
    for device in devices:
        specs += [extractor_spec(ckpt, device), composed_spec(ckpt, device)]
    specs.append(server_spec(ckpt))
    return specs
