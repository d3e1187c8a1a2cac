"""The asynchronous hub's state and steps, independent of any transport.

Devices merge complete uploads from any thread at any time; one thread (the hub's) trains
the server continuously on the bank, hands out logits as they fall due and evaluates.
Only that thread touches the model, so training never races a merge: a merge swaps the
device's slot under a lock, and the next step sees the rebuilt bank.

When the hub's feature bank spills (a service with a state dir), each device's newest
features live in ``SPILL/merged/ID.features``, memory-mapped, and the training bank gathers
one batch at a time from the mappings; a newer upload renames its file over the older one,
whose pages are freed once the last step that mapped it is done.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from edge_runtime.learning.perf import to_channels_last
from server_hub.async_mode.rules import AsyncConfig, due_devices, staleness_weight, steps_for
from server_hub.feature_bank import DeviceFeatures, FeatureBank
from server_hub.hub import Evaluation, Hub
from server_hub.trainer import (
    Rows,
    extractor_from_state,
    server_logits,
    server_step,
    split_accuracy,
)


@dataclass
class Slot:
    """A device's newest complete upload."""

    features: DeviceFeatures
    extractor: dict[str, torch.Tensor]
    update: int  # the device's own upload counter
    version: int  # hub version when it was merged
    edge_accuracy: float | None = None


def weighted_server_step(hub: Hub, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                         z_c: torch.Tensor) -> float:
    """One optimizer step on a batch, each sample's loss scaled by its staleness weight."""
    dev = hub.device
    loss, _ = server_step(hub.model, hub.optimizer, hub.cfg, h.to(dev).float(), y.to(dev),
                          z_c.to(dev), weights=w.to(dev))
    return float(loss)


class AsyncHub:
    """The async hub's state: each device's newest merged upload (its slot), the hub
    version, and continuous training on the staleness-weighted bank."""

    def __init__(self, hub: Hub, cfg: AsyncConfig) -> None:
        self.hub = hub
        self.cfg = cfg
        self.slots: dict[str, Slot] = {}
        self.version = 0  # uploads merged so far
        self.steps = 0  # server steps taken so far
        self.waiting: dict[str, int] = {}  # device -> step at which its features arrived
        spill = hub.bank.spill_dir
        self.bank = FeatureBank(spill / "merged" if spill is not None else None)
        self._lock = threading.Lock()
        self._bank_lock = threading.Lock()  # merges from several threads (in-process fleets)
        self._built = -1  # version the training tensors were built for
        self._data: tuple[torch.Tensor, ...] = ()
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        if hub.cfg.channels_last:
            to_channels_last(hub.model)

    def merge(self, device: str, features: DeviceFeatures | FeatureBank,
              extractor: dict[str, torch.Tensor], update: int,
              edge_accuracy: float | None = None) -> None:
        """A device's complete upload ``update``: replaces its older features. ``features``:
        the samples, or the bank that assembled the upload (its spill file is moved)."""
        self.hub.receive_extractor(device, extractor)
        with self._bank_lock:
            if isinstance(features, FeatureBank):
                stored = features.move(device, self.bank)
            else:
                stored = self.bank.replace(device, features)
        with self._lock:
            self.version += 1
            self.slots[device] = Slot(stored, extractor, update, self.version, edge_accuracy)
            self.waiting[device] = self.steps

    def restore_versions(self, version: int, merged_at: dict[str, int]) -> None:
        """After a restart's replay: the hub version and each slot's merge version as they
        were before the crash (replaying counted every slot as a new merge)."""
        with self._lock:
            self.version = version
            for d, v in merged_at.items():
                self.slots[d].version = v
            self._built = -1  # the weights changed

    def _weights(self) -> dict[str, float]:
        return {d: staleness_weight(self.version - s.version, self.cfg.decay,
                                    self.cfg.max_staleness) for d, s in self.slots.items()}

    def weights(self) -> dict[str, float]:
        with self._lock:
            return self._weights()

    def summary(self) -> dict[str, dict]:
        """Per merged device, for the status page: its update, the hub version it was merged
        at, its age and loss weight, its samples in the bank, whether it awaits logits."""
        with self._lock:
            weights = self._weights()
            return {d: {"update": s.update, "version": s.version,
                        "staleness": self.version - s.version, "weight": round(weights[d], 4),
                        "bank_samples": len(s.features.ids), "awaiting_logits": d in self.waiting}
                    for d, s in self.slots.items()}

    def _rebuild(self) -> None:
        with self._lock:
            weights = self._weights()
            live = [(d, s) for d, s in sorted(self.slots.items()) if weights[d] > 0]
            self._built = self.version
        if not live:
            self._data = ()
            return
        f = [s.features for _, s in live]
        w = torch.cat([torch.full((len(x.ids),), weights[d]) for (d, _), x in zip(live, f)])
        # Rows, not a concatenation: that would copy every (mapped) feature map into RAM
        self._data = (Rows([x.features for x in f]), torch.cat([x.labels for x in f]), w,
                      torch.cat([x.logits for x in f]).float())
        self._order = torch.randperm(len(w), generator=self.hub.generator)
        self._cursor = 0

    @property
    def bank_samples(self) -> int:
        return len(self._data[1]) if self._data else 0

    def train_steps(self, n: int = 1) -> float | None:
        """``n`` server steps over the bank (reshuffled each pass); mean loss, None if empty."""
        if self._built != self.version:
            self._rebuild()
        if not self._data:
            return None
        h, y, w, z_c = self._data
        bs, losses = self.hub.cfg.batch_size, []
        for _ in range(n):
            if self._cursor >= len(self._order):
                self._order = torch.randperm(len(y), generator=self.hub.generator)
                self._cursor = 0
            idx = self._order[self._cursor : self._cursor + bs]
            self._cursor += bs
            losses.append(weighted_server_step(self.hub, h[idx], y[idx], w[idx], z_c[idx]))
            self.steps += 1
        return sum(losses) / len(losses)

    def due(self) -> list[str]:
        needed = steps_for(self.bank_samples, self.hub.cfg.batch_size, self.cfg.logits_after)
        with self._lock:
            return due_devices(self.waiting, self.steps, needed)

    def take_logits(self, device: str) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(update, ids, z_s) for the device's newest features; it stops waiting."""
        with self._lock:
            slot = self.slots[device]
            self.waiting.pop(device, None)
        return slot.update, slot.features.ids, server_logits(self.hub.model, slot.features.features)

    def forget(self, device: str) -> None:
        """Stop waiting on a device (it left); its features age out by the staleness rule."""
        with self._lock:
            self.waiting.pop(device, None)

    def extractors(self) -> dict[str, dict[str, torch.Tensor]]:
        with self._lock:
            return {d: s.extractor for d, s in self.slots.items()}

    def edge_accuracy(self) -> float | None:
        with self._lock:
            accs = [s.edge_accuracy for s in self.slots.values() if s.edge_accuracy is not None]
        return sum(accs) / len(accs) if accs else None

    def evaluate(self, test_loader, server: torch.nn.Module | None = None,
                 extractors: dict[str, dict[str, torch.Tensor]] | None = None) -> Evaluation:
        """The paper's metric over the merged devices' extractors (or given snapshots)."""
        server = server if server is not None else self.hub.model
        extractors = extractors if extractors is not None else self.extractors()
        return Evaluation({d: split_accuracy(extractor_from_state(e), server, test_loader)
                           for d, e in sorted(extractors.items())})
