"""Features received from devices, keyed by (device, sample id).

With ``spill_dir`` the feature maps (nearly all the bytes of an upload) are appended to one
file per device as they arrive and come back memory-mapped, so the hub's own memory holds
only ids, labels and logits however many devices upload; the OS page cache decides which
feature pages stay resident. Without it everything stays in RAM (tests, small runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

COMPACT_ROWS = 1024  # rows copied at a time when a spill file is rewritten


@dataclass
class DeviceFeatures:
    """One device's uploaded samples: ids, feature maps, its logits and labels."""

    ids: torch.Tensor  # int64 [n]
    features: torch.Tensor  # [n, 16, S, S] (memory-mapped when spilled)
    logits: torch.Tensor  # float32 [n, C] (device logits, for optional KD on the hub)
    labels: torch.Tensor  # int64 [n]


@dataclass
class _Spilled:
    """A chunk whose features went to the device's spill file (rows in arrival order)."""

    ids: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


def _keep_last_sorted(ids: torch.Tensor) -> torch.Tensor:
    """Indices of the last occurrence of every id, in increasing id order."""
    rev = torch.flip(torch.arange(len(ids)), [0])
    _, first = np.unique(ids[rev].numpy(), return_index=True)
    return rev[torch.from_numpy(first)]


def _is_identity(keep: torch.Tensor) -> bool:
    return bool((keep == torch.arange(len(keep))).all())


class FeatureBank:
    """Accumulates chunks per device; re-sent samples replace old ones (idempotent)."""

    def __init__(self, spill_dir: str | Path | None = None) -> None:
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._chunks: dict[str, list[DeviceFeatures | _Spilled]] = {}
        self._frozen: dict[str, DeviceFeatures] = {}
        self._row_shape: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def add(self, device: str, chunk: DeviceFeatures) -> None:
        self._frozen.pop(device, None)
        if self.spill_dir is None:
            self._chunks.setdefault(device, []).append(chunk)
            return
        feats = np.ascontiguousarray(chunk.features.numpy())
        shape = (feats.shape[1:], feats.dtype)
        if self._row_shape.setdefault(device, shape) != shape:
            raise ValueError(f"device {device}: features {feats.shape[1:]} {feats.dtype} after "
                             f"{shape[0]} {shape[1]} in the same round")
        if device not in self._chunks:  # a device's first chunk: its folder may be new
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        with open(self._path(device), "ab") as f:
            f.write(memoryview(feats).cast("B"))
        self._chunks.setdefault(device, []).append(_Spilled(chunk.ids, chunk.logits,
                                                            chunk.labels))

    def clear(self, device: str | None = None) -> None:
        for d in [device] if device is not None else list(self._chunks):
            self._chunks.pop(d, None)
            self._frozen.pop(d, None)
            self._row_shape.pop(d, None)
            if self.spill_dir is not None:
                self._path(d).unlink(missing_ok=True)

    @property
    def devices(self) -> list[str]:
        return sorted(self._chunks)

    def replace(self, device: str, features: DeviceFeatures) -> DeviceFeatures:
        """The device's samples become exactly ``features``; returns them as get() would."""
        self.clear(device)
        self.add(device, features)
        return self.get(device)

    def move(self, device: str, dest: FeatureBank) -> DeviceFeatures:
        """Hand the device's samples to ``dest``, replacing what it held for the device, and
        forget them here. Between two spilling banks (on one filesystem) the spill file is
        renamed, not copied; mappings of the file dest replaced stay valid until dropped."""
        feats = self.get(device)
        if self.spill_dir is None or dest.spill_dir is None:
            moved = dest.replace(device, feats)
            self.clear(device)
            return moved
        dest.clear(device)
        dest.spill_dir.mkdir(parents=True, exist_ok=True)
        if self._path(device).exists():  # absent only for a device with no rows
            self._path(device).replace(dest._path(device))
        dest._row_shape[device] = self._row_shape[device]
        dest._chunks[device] = [_Spilled(feats.ids, feats.logits, feats.labels)]
        dest._frozen[device] = feats  # its mapping follows the renamed file
        self.clear(device)
        return feats

    def get(self, device: str) -> DeviceFeatures:
        """All of a device's samples, deduplicated by id (last write wins), sorted by id."""
        if device not in self._frozen:
            parts = self._chunks[device]
            ids = torch.cat([p.ids for p in parts])
            keep = _keep_last_sorted(ids)
            if self.spill_dir is None:
                features = (parts[0].features if len(parts) == 1 else
                            torch.cat([p.features for p in parts]))
                if not _is_identity(keep):
                    features = features[keep]
            else:
                features = self._compact(device, keep, len(ids))
            self._frozen[device] = DeviceFeatures(
                ids[keep], features,
                torch.cat([p.logits for p in parts])[keep],
                torch.cat([p.labels for p in parts])[keep],
            )
            frozen = self._frozen[device]
            self._chunks[device] = [_Spilled(frozen.ids, frozen.logits, frozen.labels)
                                    if self.spill_dir is not None else frozen]
        return self._frozen[device]

    def num_samples(self, device: str | None = None) -> int:
        devices = [device] if device else self.devices
        return sum(len(self.get(d).ids) for d in devices)

    def resident_feature_bytes(self) -> int:
        """Feature bytes held in the hub's own memory (0 when spilled: they are mapped)."""
        if self.spill_dir is not None:
            return 0
        return sum(p.features.numel() * p.features.element_size()
                   for parts in self._chunks.values() for p in parts)

    # -- spill files ----------------------------------------------------------------------
    def _path(self, device: str) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"{device}.features"

    def _map(self, device: str, rows: int) -> torch.Tensor:
        shape, dtype = self._row_shape[device]
        if rows == 0:
            return torch.from_numpy(np.empty((0, *shape), dtype))
        # Copy-on-write: the tensor is writable (torch wants that) and the file stays intact.
        return torch.from_numpy(np.memmap(self._path(device), dtype, "c", shape=(rows, *shape)))

    def _compact(self, device: str, keep: torch.Tensor, rows: int) -> torch.Tensor:
        """Memory-map the device's rows ``keep``, rewriting its file (a block at a time)
        when resends or out-of-order chunks left it out of id order."""
        if len(keep) == rows and _is_identity(keep):
            return self._map(device, rows)
        old = self._map(device, rows).numpy()
        path = self._path(device)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for s in range(0, len(keep), COMPACT_ROWS):
                f.write(memoryview(np.ascontiguousarray(old[keep[s:s + COMPACT_ROWS].numpy()]))
                        .cast("B"))
        del old
        tmp.replace(path)
        return self._map(device, len(keep))
