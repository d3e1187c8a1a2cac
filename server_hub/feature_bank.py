"""Features received from devices, keyed by (device, sample id)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DeviceFeatures:
    ids: torch.Tensor  # int64 [n]
    features: torch.Tensor  # [n, 16, S, S]
    logits: torch.Tensor  # float32 [n, C] (device logits, for optional KD on the hub)
    labels: torch.Tensor  # int64 [n]


class FeatureBank:
    """Accumulates chunks per device; re-sent samples replace old ones (idempotent)."""

    def __init__(self) -> None:
        self._chunks: dict[str, list[DeviceFeatures]] = {}
        self._frozen: dict[str, DeviceFeatures] = {}

    def add(self, device: str, chunk: DeviceFeatures) -> None:
        self._chunks.setdefault(device, []).append(chunk)
        self._frozen.pop(device, None)

    def clear(self, device: str | None = None) -> None:
        if device is None:
            self._chunks.clear()
            self._frozen.clear()
        else:
            self._chunks.pop(device, None)
            self._frozen.pop(device, None)

    @property
    def devices(self) -> list[str]:
        return sorted(self._chunks)

    def get(self, device: str) -> DeviceFeatures:
        """All of a device's samples, deduplicated by id (last write wins), sorted by id."""
        if device not in self._frozen:
            parts = self._chunks[device]
            ids = torch.cat([p.ids for p in parts])
            # Keep the last occurrence of every id: reverse, unique-first, reverse back.
            rev = torch.flip(torch.arange(len(ids)), [0])
            _, first = np.unique(ids[rev].numpy(), return_index=True)
            keep = rev[torch.from_numpy(first)]
            self._frozen[device] = DeviceFeatures(
                ids[keep],
                torch.cat([p.features for p in parts])[keep],
                torch.cat([p.logits for p in parts])[keep],
                torch.cat([p.labels for p in parts])[keep],
            )
            self._chunks[device] = [self._frozen[device]]
        return self._frozen[device]

    def num_samples(self, device: str | None = None) -> int:
        devices = [device] if device else self.devices
        return sum(len(self.get(d).ids) for d in devices)
