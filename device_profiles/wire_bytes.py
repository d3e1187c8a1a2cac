"""Bytes on the wire per GKT round, measured by encoding real messages with the toolkit's
own wire format (``edge_runtime.protocol.messages``), not from nominal ratios.

Features H come from the edge model (seed 0, untrained, eval mode) on two kinds of input:
real images (scikit-learn's digits upsampled to S x S; mostly flat background, so H is
sparse and compresses well) and uniform noise images (dense H: an upper bound). Natural
images such as CIFAR-10 fall in between. Transfer times use the upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_runtime.learning.models import FEATURE_CHANNELS, EdgeResNet8
from edge_runtime.protocol.codecs import FEATURE_CODECS
from edge_runtime.protocol.messages import (
    FeatureBatch,
    extractor_message,
    feature_chunk,
    logits_messages,
)

CHUNK_SAMPLES = 64  # samples per measured message; headers are amortised over them


@dataclass(frozen=True)
class WireCost:
    codec: str
    up_bytes_per_sample: float  # feature chunk: H + logits + label + id + header share
    up_bytes_per_sample_dense: float  # the same for noise images: the upper bound
    down_bytes_per_sample: float  # hub logits for the sample + id + header share
    up_bytes_per_round: int  # extractor weights + upload_done, once per round
    raw_fp32_feature_bytes: int  # 16 x S x S x 4: H alone, uncompressed
    how: str

    def round_bytes(self, samples: int, dense: bool = False) -> tuple[int, int]:
        """(uploaded, downloaded) bytes for one round of ``samples`` samples."""
        per = self.up_bytes_per_sample_dense if dense else self.up_bytes_per_sample
        return (round(samples * per) + self.up_bytes_per_round,
                round(samples * self.down_bytes_per_sample))


def _digits(n: int, size: int) -> tuple[torch.Tensor, str] | None:
    from edge_runtime.learning.data import DataConfig, load_split

    try:
        split = load_split(DataConfig("digits", image_size=size, augment=False), True)
    except ImportError:  # scikit-learn (the [data] extra) is not installed
        return None
    return (torch.stack([split.dataset[i][0] for i in range(n)]),
            f"scikit-learn digits upsampled to {size}x{size}")


def _noise(n: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


def _chunk_bytes(model: torch.nn.Module, x: torch.Tensor, codec: str) -> int:
    with torch.inference_mode():
        logits, h = model(x)
    ids = torch.arange(len(x), dtype=torch.int64)
    batch = FeatureBatch(ids, h.contiguous(), logits, torch.zeros(len(x), dtype=torch.int64))
    return len(feature_chunk("dev0", 1, "r1-00000000:0", 0, 1, batch, codec))


def measure_wire_cost(codec: str, num_classes: int = 10, image_size: int = 32) -> WireCost:
    if codec not in FEATURE_CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(FEATURE_CODECS)}")
    torch.manual_seed(0)
    model = EdgeResNet8(num_classes).eval()
    noise = _noise(CHUNK_SAMPLES, image_size)
    real = _digits(CHUNK_SAMPLES, image_size)
    x, what = real if real is not None else (noise, "noise images (no scikit-learn)")
    ids = torch.arange(CHUNK_SAMPLES, dtype=torch.int64).numpy()
    down = logits_messages("dev0", 1, ids, torch.randn(CHUNK_SAMPLES, num_classes),
                           CHUNK_SAMPLES)
    extractor = extractor_message("dev0", 1, "r1-00000000:extractor",
                                  model.extractor.state_dict())
    done_header = 256  # the small upload_done message (header only)
    return WireCost(
        codec=codec,
        up_bytes_per_sample=_chunk_bytes(model, x, codec) / CHUNK_SAMPLES,
        up_bytes_per_sample_dense=_chunk_bytes(model, noise, codec) / CHUNK_SAMPLES,
        down_bytes_per_sample=sum(len(m) for m in down) / CHUNK_SAMPLES,
        up_bytes_per_round=len(extractor) + done_header,
        raw_fp32_feature_bytes=FEATURE_CHANNELS * image_size * image_size * 4,
        how=(f"measured: edge_runtime wire messages of {CHUNK_SAMPLES} samples, codec "
             f"{codec}, H of an untrained ResNet-8 on {what} (upper bound: noise images)"),
    )


def measure_all(num_classes: int = 10, image_size: int = 32) -> dict[str, WireCost]:
    return {c: measure_wire_cost(c, num_classes, image_size) for c in FEATURE_CODECS}


def fedavg_round_bytes(params: int) -> tuple[int, int]:
    """FedAvg ships the whole fp32 model up and down once per round (no compression)."""
    return 4 * params, 4 * params
