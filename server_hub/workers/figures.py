"""The whole hub's figures when K workers split the device traffic (``serve --workers K``).

A shared subscription hands each device message to one worker, so each worker's
``FleetObserver`` sees only its share. Every worker keeps a ``WorkerFleet``; at every
round-state exchange (each ``poll`` seconds while collecting) and once after each round
the workers all-gather ``counts()``, and rank 0, which serves the metrics and the status
page, keeps the others' latest: bytes, rejections and samples are summed over workers, a
device's view merges what each worker saw of it, and its state follows the merged
uploads. The other workers' figures lag by at most one exchange (there is none while the
server trains).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace

from server_hub.hub_status import HubStatus
from server_hub.monitoring.snapshot import DeviceView, FleetObserver

ACTIVE = ("uploaded", "uploading", "training", "waiting")  # FleetObserver's sync states


@dataclass(frozen=True)
class WorkerCounts:
    """What one worker alone received and sent (travels over the process group)."""

    bytes_received: int
    bytes_sent: int
    rejected: dict[str, int]
    samples_received: int
    devices: dict[str, DeviceView]


def merge_views(a: DeviceView, b: DeviceView) -> DeviceView:
    """One device as two workers saw it: traffic summed, the latest report wins."""
    old, new = (a, b) if a.last_seen <= b.last_seen else (b, a)
    # replace(): fields not named here (last_seen, last_upload, ...) are the newer view's
    return replace(new, first_seen=min(a.first_seen, b.first_seen),
                   last_round=max(a.last_round, b.last_round), messages=a.messages + b.messages,
                   bytes_up=a.bytes_up + b.bytes_up, codec=new.codec or old.codec,
                   reported={**old.reported, **new.reported})


def claimed_samples(intake, device: str) -> tuple[str, int] | None:
    """A worker holds only part of each upload, so monitoring counts upload_done's claim,
    which the intake caps at the device's hello (itself capped by AdmissionLimits)."""
    up = intake.uploads.get(device)
    return (up.upload_id, max(up.claimed, 0)) if up is not None and up.done else None


class WorkerFleet(FleetObserver):
    """A worker's fleet observer; rank 0's also merges the other workers' counts."""

    def __init__(self, clock=time.time) -> None:
        super().__init__(clock)
        self.peers: list[WorkerCounts] = []  # the other workers' latest (rank 0)
        self.uploads_done: frozenset[str] = frozenset()  # complete on all workers together
        self.uploading: frozenset[str] = frozenset()  # with upload messages on any worker

    def counts(self, status: HubStatus) -> WorkerCounts:
        with self._lock:
            devices = {d: replace(v, reported=dict(v.reported)) for d, v in self.devices.items()}
            samples = self.samples_received
        return WorkerCounts(status.bytes_received, status.bytes_sent, status.rejected,
                            samples, devices)

    def update(self, peers: list[WorkerCounts], complete=(), started=()) -> None:
        with self._lock:
            self.peers = list(peers)
            self.uploads_done, self.uploading = frozenset(complete), frozenset(started)

    def device_views(self) -> dict[str, DeviceView]:
        views = super().device_views()
        for peer in self.peers:
            for d, v in peer.devices.items():
                views[d] = merge_views(views[d], v) if d in views else replace(
                    v, reported=dict(v.reported))
        return views

    def snapshot(self, service) -> dict:
        s = super().snapshot(service)
        with self._lock:
            peers, complete, started = list(self.peers), self.uploads_done, self.uploading
        s["bytes_received"] += sum(p.bytes_received for p in peers)
        s["bytes_sent"] += sum(p.bytes_sent for p in peers)
        s["samples_received"] += sum(p.samples_received for p in peers)
        rejected = Counter(s["rejected"])
        for p in peers:
            rejected.update(p.rejected)
        s["rejected"] = dict(rejected)
        if s["phase"] in ("collect", "train"):  # this worker's own uploads are partial
            for d in s["devices"]:
                if d["state"] not in ACTIVE:  # silent stays silent: devices_active holds
                    continue
                if d["id"] in complete:
                    d["state"] = "uploaded"
                elif d["id"] in started and s["phase"] == "collect":
                    d["state"] = "uploading"
        return s
