"""A round's upload as wire messages, for the MQTT agent and the in-process simulator alike:
feature chunks as the refresh policy decides (refresh.py), then the extractor weights,
then upload_done naming the feature epoch the hub holds once it applies them all."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from edge_runtime.device.edge_device import EdgeDevice
from edge_runtime.learning.train import FeatureBatch
from edge_runtime.protocol import wire
from edge_runtime.protocol.messages import extractor_message, feature_chunk
from edge_runtime.protocol.refresh_policy import RefreshPolicy


def rebatch(batches: Iterator[FeatureBatch], size: int) -> Iterator[FeatureBatch]:
    """Regroup extraction batches into upload chunks of exactly ``size`` (last may be short)."""
    pending: list[FeatureBatch] = []
    count = 0
    for b in batches:
        pending.append(b)
        count += len(b.ids)
        while count >= size:
            merged = _cat(pending)
            yield _slice(merged, 0, size)
            rest = _slice(merged, size, count)
            pending, count = ([rest], count - size) if count > size else ([], 0)
    if count:
        yield _cat(pending)


def _cat(parts: list[FeatureBatch]) -> FeatureBatch:
    if len(parts) == 1:
        return parts[0]
    return FeatureBatch(*(torch.cat([getattr(p, f) for p in parts])
                          for f in ("ids", "features", "logits", "labels")))


def _slice(b: FeatureBatch, lo: int, hi: int) -> FeatureBatch:
    return FeatureBatch(b.ids[lo:hi], b.features[lo:hi], b.logits[lo:hi], b.labels[lo:hi])


def per_chunk(dev: EdgeDevice, max_payload: int, maps: bool = True, logits: bool = True) -> int:
    """Samples per feature chunk: what fits ``max_payload`` at fp32, the worst case (with
    ``maps`` False: ids, labels and logits alone; with ``logits`` False, without logits)."""
    x = dev._extract.dataset[0][0]
    raw = ((16 * x.shape[-1] * x.shape[-2] * 4 if maps else 0)
           + (dev.bank.num_classes * 4 if logits else 0) + 16)
    return wire.chunk_sizes(dev.num_samples, raw, max_payload)[0]


def upload_messages(dev: EdgeDevice, rnd: int, upload_id: str, max_payload: int, codec: str,
                    policy: RefreshPolicy, logits_codec: str | None,
                    done_meta: dict | None = None) -> Iterator[tuple[str, bytes]]:
    """(msg id, payload) of the whole upload, each at most ``max_payload`` bytes;
    ``logits_codec`` None leaves the device's logits out (the hub does not distil)."""
    digest = dev.extractor_digest()
    size = per_chunk(dev, max_payload, maps=not dev.mirror.unchanged(digest, policy),
                     logits=logits_codec is not None)
    n_chunks = -(-dev.num_samples // size)
    pieces = dev.mirror.plan(rebatch(dev.features(), size), digest, codec, policy)
    for i, p in enumerate(pieces):
        mid = f"{upload_id}:{i}"
        yield mid, feature_chunk(dev.device_id, rnd, mid, i, n_chunks, p.batch, p.codec,
                                 logits_codec, rows=p.rows, base=p.base)
    mid = f"{upload_id}:extractor"
    yield mid, extractor_message(dev.device_id, rnd, mid, dev.extractor_state())
    mid = f"{upload_id}:done"
    meta = {**(done_meta or {}), "num_samples": dev.num_samples, "num_chunks": n_chunks,
            "upload_id": upload_id, "epoch": dev.mirror.pending_epoch}
    yield mid, wire.encode_message("upload_done", dev.device_id, rnd, {}, msg_id=mid, meta=meta)
