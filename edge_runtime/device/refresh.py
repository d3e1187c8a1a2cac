"""Which feature maps a device uploads, and its copy of what the hub holds (docs/uplink.md).

The hub keeps every sample's latest feature map. A device tracks the hub's copy by its
**feature epoch**: a name the device gives each upload; the hub reports the epoch it holds
in every logits message, so the device commits its copy only when the hub confirms it. An
upload that builds on the hub's copy (omitted rows, s8 residuals) names that epoch as its
``base``; a hub holding anything else refuses it (ack ``resync``) and the device sends full
maps again. Hub or device restarts and skipped rounds thus cost at most one full upload;
the two copies never drift apart.

Policies (joined with "+"; "full" sends every map every round, as the reference):
  freeze:W  the extractor trains for rounds < W only, so later maps are bit-identical to
            what the hub holds and a round uploads ids, labels and logits alone
  drift:B   send a sample's map only when ||H - held|| / ||held|| > B
  delta     send s8 residuals H - held (rows past the drift bound, or all); the residual
            is taken against the hub's reconstruction, so quantization error is fed back
Whatever the policy, nothing is re-sent while the extractor is bit-identical to the one
that produced the hub's copy (the extraction pass is un-augmented and deterministic).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_runtime.learning.train import FeatureBatch
from edge_runtime.protocol.codecs import get_codec
from edge_runtime.protocol.messages import RESIDUAL_CODEC
from edge_runtime.protocol.refresh_policy import RefreshPolicy


def extractor_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Piece:
    """One upload chunk's content: ``batch`` with the maps of ``rows`` only (all rows when
    None), coded ``codec``; ``base``: the epoch it builds on."""

    batch: FeatureBatch
    codec: str
    rows: np.ndarray | None
    base: str | None


class FeatureMirror:
    """The device's idea of what the hub holds of its features; persisted with its state."""

    def __init__(self, sample_ids: np.ndarray) -> None:
        self.ids = np.asarray(sample_ids, dtype=np.int64)  # sorted
        self.epoch: str | None = None
        self.digest: str | None = None  # extractor that made the hub's copy
        self.values: np.ndarray | None = None  # the hub's reconstruction, when kept
        self._pending: tuple[str, str, np.ndarray | None] | None = None

    def invalidate(self) -> None:
        self.epoch = self.digest = self.values = None
        self._pending = None

    def unchanged(self, digest: str, policy: RefreshPolicy) -> bool:
        """Whether the hub holds maps from this very extractor: an upload sends none."""
        return (self.epoch is not None and digest == self.digest
                and (not policy.needs_values or self.values is not None))

    def plan(self, batches: Iterator[FeatureBatch], digest: str, codec: str,
             policy: RefreshPolicy) -> Iterator[Piece]:
        """What to send of each batch; records the reconstruction the hub will hold once it
        applies all of it as pending (``confirm`` commits it)."""
        epoch = uuid.uuid4().hex[:16]
        base = self.epoch
        unchanged = self.unchanged(digest, policy)
        keep = policy.needs_values
        usable = base is not None and (not keep or self.values is not None)
        pending = None
        if keep:
            pending = (self.values.copy() if usable else None)
        for b in batches:
            pos = np.searchsorted(self.ids, b.ids.numpy())
            feats = b.features.float().numpy()
            if usable and unchanged:
                piece = Piece(_rows(b, []), codec, np.empty(0, np.int64), base)
            elif not usable or not keep:
                piece = Piece(b, codec, None, None)
                if keep:
                    if pending is None:
                        pending = np.zeros((len(self.ids), *feats.shape[1:]), np.float32)
                    pending[pos] = _roundtrip(feats, codec)
            else:
                held = pending[pos]
                diff = feats - held
                rows = np.arange(len(pos))
                if policy.drift is not None:
                    change = np.linalg.norm(diff.reshape(len(pos), -1), axis=1)
                    size = np.linalg.norm(held.reshape(len(pos), -1), axis=1)
                    rows = rows[change > policy.drift * np.maximum(size, 1e-12)]
                if policy.delta:
                    sent = diff[rows]
                    pending[pos[rows]] = held[rows] + _roundtrip(sent, RESIDUAL_CODEC)
                    piece = Piece(_rows(b, rows, sent), RESIDUAL_CODEC, rows, base)
                else:
                    sent = feats[rows]
                    pending[pos[rows]] = _roundtrip(sent, codec)
                    piece = Piece(_rows(b, rows, sent), codec, rows, base)
            yield piece
        self._pending = (epoch, digest, pending)

    @property
    def pending_epoch(self) -> str | None:
        return self._pending[0] if self._pending else None

    def confirm(self, hub_epoch: str | None) -> None:
        """The hub says it holds ``hub_epoch``: commit the pending copy, keep ours, or (for
        anything else) forget both so the next upload is full."""
        if self._pending is not None and hub_epoch == self._pending[0]:
            self.epoch, self.digest, self.values = self._pending
        elif hub_epoch != self.epoch or hub_epoch is None:
            self.invalidate()
        self._pending = None

    # -- persistence (the device's state directory) -----------------------------------------
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "mirror.json"
        meta.unlink(missing_ok=True)  # values and epoch change together or not at all
        values = folder / "mirror.npy"
        if self.values is not None:
            tmp = folder / "mirror.tmp.npy"
            np.save(tmp, self.values)
            tmp.replace(values)
        else:
            values.unlink(missing_ok=True)
        tmp = folder / "mirror.json.tmp"
        tmp.write_text(json.dumps({"epoch": self.epoch, "digest": self.digest,
                                   "values": self.values is not None,
                                   "samples": len(self.ids)}))
        with open(tmp) as f:
            os.fsync(f.fileno())
        tmp.replace(meta)

    def load(self, folder: Path) -> None:
        """Restore; anything missing or off leaves no epoch (the next upload is full)."""
        self.invalidate()
        try:
            meta = json.loads((folder / "mirror.json").read_text())
            if meta["samples"] != len(self.ids):
                return
            values = np.load(folder / "mirror.npy") if meta["values"] else None
            if values is not None and (values.dtype != np.float32 or len(values) != len(self.ids)):
                return
            self.epoch, self.digest, self.values = meta["epoch"], meta["digest"], values
        except (OSError, ValueError, KeyError, TypeError):
            return


def _roundtrip(x: np.ndarray, codec: str) -> np.ndarray:
    """What the hub decodes from ``x`` sent with ``codec`` (the same function runs there)."""
    c = get_codec(codec)
    return c.decode(c.encode(x), x.shape)


def _rows(b: FeatureBatch, rows, features: np.ndarray | None = None) -> FeatureBatch:
    if features is None:
        features = np.zeros((len(rows), *b.features.shape[1:]), np.float32)
    return FeatureBatch(b.ids, torch.from_numpy(np.ascontiguousarray(features)), b.logits,
                        b.labels)
