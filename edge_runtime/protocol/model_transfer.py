"""A trained model's ONNX file over the wire: hub -> device in checksummed chunks.

    model          hub -> device   one slice of the file: tensor ``data`` (uint8, exact),
                                   meta {variant, sha256, total_bytes, offset}; round = the
                                   training round the weights come from
    model_request  device -> hub   "send me my current model" (``gkt-edge fetch-model``)
    model_ack      device -> hub   meta {variant, sha256, total_bytes}: stored, checksum good

Each chunk is a normal wire message (CRC-32 over its payload, size limits, no pickle);
the SHA-256 of the whole file decides whether the assembled bytes are kept. Chunks may
arrive twice or out of order (QoS 1 after a reconnect); a chunk of another file (other
round, variant or checksum) starts a new assembly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.protocol import wire
from edge_runtime.protocol.limits import HEADER_ROOM
from edge_runtime.protocol.schema import MODEL_VARIANTS


@dataclass(frozen=True)
class ModelFile:
    """A complete, checksum-verified model file."""

    round: int
    variant: str  # fp32 | int8
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def model_messages(device: str, model: ModelFile, max_payload: int,
                   variants: list[str] | None = None) -> list[bytes]:
    """The file as ``model`` messages that each fit ``max_payload`` bytes. ``variants``:
    every variant sent for this round, so the device knows when it has them all."""
    if model.variant not in MODEL_VARIANTS:
        raise ValueError(f"unknown model variant {model.variant!r}")
    per = max_payload - HEADER_ROOM
    if per <= 0:
        raise ValueError(f"max_payload {max_payload} leaves no room for model bytes")
    total, sha = len(model.data), model.sha256
    raw = np.frombuffer(model.data, dtype=np.uint8)
    starts = range(0, total, per)
    return [
        wire.encode_message(
            "model", device, model.round, {"data": (raw[s:s + per], "exact")},
            msg_id=f"model-{model.round}-{model.variant}-{i}", chunk=i, chunks=len(starts),
            meta={"variant": model.variant, "sha256": sha, "total_bytes": total, "offset": s,
                  "variants": list(variants or [model.variant])})
        for i, s in enumerate(starts)
    ]


def ack_message(device: str, model: ModelFile) -> bytes:
    return wire.encode_message(
        "model_ack", device, model.round, {},
        msg_id=f"model-ack-{model.round}-{model.variant}",
        meta={"variant": model.variant, "sha256": model.sha256,
              "total_bytes": len(model.data)})


def request_message(device: str, nonce: str) -> bytes:
    return wire.encode_message("model_request", device, 0, {}, msg_id=f"model-req-{nonce}")


@dataclass
class _Assembly:
    key: tuple[int, str, str, int, int]  # round, variant, sha256, total bytes, chunks
    parts: dict[int, bytes] = field(default_factory=dict)  # byte offset -> bytes


class ModelAssembler:
    """Collects ``model`` chunks, one file per variant at a time.

    ``add`` returns the ModelFile when its last chunk arrives and the SHA-256 matches;
    WireError("checksum") if it does not (the assembly is dropped: ask again).
    """

    def __init__(self) -> None:
        self._open: dict[str, _Assembly] = {}

    def add(self, msg: wire.Message) -> ModelFile | None:
        meta = msg.meta
        variant = meta["variant"]
        key = (msg.round, variant, meta["sha256"], meta["total_bytes"], msg.chunks)
        asm = self._open.get(variant)
        if asm is None or asm.key != key:
            if asm is not None and asm.key[0] > msg.round:
                return None  # a late chunk of an older model than the one being assembled
            asm = self._open[variant] = _Assembly(key)
        asm.parts[meta["offset"]] = msg.tensors["data"].tobytes()
        if len(asm.parts) < msg.chunks:
            return None
        del self._open[variant]
        blob, pos = bytearray(), 0
        for offset in sorted(asm.parts):
            if offset != pos:  # a gap or an overlap: the chunks do not tile the file
                raise wire.WireError("corrupt", f"model {variant} round {msg.round}: a chunk "
                                                f"starts at byte {offset}, expected {pos}")
            blob += asm.parts[offset]
            pos += len(asm.parts[offset])
        blob = bytes(blob)
        if len(blob) != meta["total_bytes"]:
            raise wire.WireError("truncated", f"model {variant} round {msg.round}: chunks hold "
                                              f"{len(blob)} bytes, header says "
                                              f"{meta['total_bytes']}")
        got = hashlib.sha256(blob).hexdigest()
        if got != meta["sha256"]:
            raise wire.WireError("checksum", f"model {variant} round {msg.round}: SHA-256 "
                                             f"{got[:12]}... != {meta['sha256'][:12]}...")
        return ModelFile(msg.round, variant, blob)
