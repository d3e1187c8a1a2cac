"""GKT payloads <-> wire messages: feature chunks, logits, extractor weights.

A feature chunk carries ids, labels and logits for every sample and feature maps for all
of them, or (``rows``) only for some: the rest the hub already holds at the feature epoch
named by meta ``base``. Maps coded ``s8`` are residuals against what the hub holds
(docs/uplink.md). Ids travel delta-coded; logits in ``LOGITS_CODEC``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge_runtime.protocol import wire
from edge_runtime.protocol.codecs import LOGITS_CODEC

RESIDUAL_CODEC = "s8"


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
    feature_epoch: str | None = None  # what the hub now holds of this device's features


@dataclass(frozen=True)
class FeatureChunk:
    """A decoded feature chunk: ``features`` are the maps of ``rows`` (all rows when None),
    residuals against the hub's copy when ``residual``."""

    ids: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor | None  # None: the device left its logits out
    features: torch.Tensor
    rows: np.ndarray | None = None
    base: str | None = None
    residual: bool = False

    @property
    def complete(self) -> bool:
        """Whether it stands alone (no rows omitted, no residuals)."""
        return self.rows is None and not self.residual


def feature_chunk(device: str, round_: int, msg_id: str, chunk: int, chunks: int,
                  batch: FeatureBatch, codec: str, logits_codec: str | None = LOGITS_CODEC,
                  rows: np.ndarray | None = None, base: str | None = None) -> bytes:
    """``batch.features`` holds the maps of ``rows`` only when ``rows`` is given; with
    ``codec`` "s8" they are residuals. Both need ``base``. ``logits_codec`` None leaves the
    logits out."""
    tensors = {
        "ids": (batch.ids.numpy().astype(np.int64), "delta"),
        "labels": (batch.labels.numpy(), "exact"),
        "logits": (batch.logits.float().numpy(), logits_codec),
        "features": (batch.features.float().numpy(), codec),
    }
    if logits_codec is None:
        del tensors["logits"]
    if rows is not None:
        tensors["rows"] = (np.asarray(rows, dtype=np.int64), "delta")
    meta = {"base": base} if base is not None else None
    return wire.encode_message("features", device, round_, tensors, msg_id=msg_id,
                               chunk=chunk, chunks=chunks, meta=meta)


def parse_feature_chunk(msg: wire.Message) -> FeatureChunk:
    t = msg.tensors
    return FeatureChunk(
        torch.from_numpy(np.ascontiguousarray(t["ids"])),
        torch.from_numpy(np.ascontiguousarray(t["labels"])),
        torch.from_numpy(np.ascontiguousarray(t["logits"], dtype=np.float32))
        if "logits" in t else None,
        torch.from_numpy(np.ascontiguousarray(t["features"], dtype=np.float32)),
        np.array(t["rows"]) if "rows" in t else None,
        msg.meta.get("base"),
        next(s.codec for s in msg.specs if s.name == "features") == RESIDUAL_CODEC,
    )


def extractor_message(device: str, round_: int, msg_id: str,
                      state: dict[str, torch.Tensor]) -> bytes:
    tensors = {k: (v.detach().cpu().numpy(), "exact") for k, v in state.items()}
    return wire.encode_message("extractor", device, round_, tensors, msg_id=msg_id)


def parse_extractor(msg: wire.Message) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in msg.tensors.items()}


def logits_messages(device: str, round_: int, ids: np.ndarray, logits: torch.Tensor,
                    per_chunk: int, codec: str = LOGITS_CODEC,
                    feature_epoch: str | None = None) -> list[bytes]:
    n = len(ids)
    starts = list(range(0, n, per_chunk)) or [0]
    meta = {"feature_epoch": feature_epoch}
    return [
        wire.encode_message(
            "logits", device, round_,
            {"ids": (np.asarray(ids[s:s + per_chunk], dtype=np.int64), "delta"),
             "logits": (logits[s:s + per_chunk].float().numpy(), codec)},
            msg_id=f"logits-{round_}-{i}", chunk=i, chunks=len(starts), meta=meta,
        )
        for i, s in enumerate(starts)
    ]


def parse_logits(msg: wire.Message) -> LogitsChunk:
    return LogitsChunk(np.array(msg.tensors["ids"], dtype=np.int64),
                       torch.from_numpy(np.array(msg.tensors["logits"], dtype=np.float32)),
                       msg.meta.get("feature_epoch"))
