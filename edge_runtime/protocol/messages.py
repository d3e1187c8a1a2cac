"""GKT payloads <-> wire messages: feature chunks, logits, extractor weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge_runtime.protocol import wire

LOGITS_CODEC = "fp32"


@dataclass(frozen=True)
class FeatureBatch:
    """What a device uploads for a batch of its samples, keyed by sample id."""

    ids: torch.Tensor  # int64 [k]
    features: torch.Tensor  # float32 [k, 16, S, S], post-ReLU
    logits: torch.Tensor  # float32 [k, C]
    labels: torch.Tensor  # int64 [k]


@dataclass(frozen=True)
class LogitsChunk:
    ids: np.ndarray
    logits: torch.Tensor


def feature_chunk(device: str, round_: int, msg_id: str, chunk: int, chunks: int,
                  batch: FeatureBatch, codec: str) -> bytes:
    return wire.encode_message(
        "features", device, round_,
        {
            "ids": (batch.ids.numpy(), "exact"),
            "labels": (batch.labels.numpy(), "exact"),
            "logits": (batch.logits.float().numpy(), LOGITS_CODEC),
            "features": (batch.features.float().numpy(), codec),
        },
        msg_id=msg_id, chunk=chunk, chunks=chunks,
    )


def parse_feature_chunk(msg: wire.Message) -> FeatureBatch:
    t = msg.tensors
    return FeatureBatch(
        torch.from_numpy(np.ascontiguousarray(t["ids"])),
        torch.from_numpy(np.ascontiguousarray(t["features"], dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(t["logits"], dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(t["labels"])),
    )


def extractor_message(device: str, round_: int, msg_id: str,
                      state: dict[str, torch.Tensor]) -> bytes:
    tensors = {k: (v.detach().cpu().numpy(), "exact") for k, v in state.items()}
    return wire.encode_message("extractor", device, round_, tensors, msg_id=msg_id)


def parse_extractor(msg: wire.Message) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in msg.tensors.items()}


def logits_messages(device: str, round_: int, ids: np.ndarray, logits: torch.Tensor,
                    per_chunk: int) -> list[bytes]:
    n = len(ids)
    starts = list(range(0, n, per_chunk)) or [0]
    return [
        wire.encode_message(
            "logits", device, round_,
            {"ids": (np.asarray(ids[s:s + per_chunk], dtype=np.int64), "exact"),
             "logits": (logits[s:s + per_chunk].float().numpy(), LOGITS_CODEC)},
            msg_id=f"logits-{round_}-{i}", chunk=i, chunks=len(starts),
        )
        for i, s in enumerate(starts)
    ]


def parse_logits(msg: wire.Message) -> LogitsChunk:
    return LogitsChunk(np.array(msg.tensors["ids"], dtype=np.int64),
                       torch.from_numpy(np.array(msg.tensors["logits"], dtype=np.float32)))
