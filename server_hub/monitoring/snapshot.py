"""What the fleet is doing, as one JSON-able snapshot for metrics, the status page and
`gkt-hub status`.

``FleetObserver`` is attached to a service (``service.add_observer``: sync, async or a hub
worker) and hears about every accepted message, and about every finished round through the
service's ``on_round`` callback; everything else (round, phase, uploads, rejections, bytes)
is read from ``service.status()`` (a ``HubStatus``) when a snapshot is taken. In async mode
there are no rounds: a device is uploading, waiting for logits, training or gone, and its row says
which update of it is in the bank, merged at which hub version, how stale. Device-reported
figures arrive in the ``device_metrics`` of their hello and upload_done messages, are
untrusted input, and are kept only if they are known names with finite numbers.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field

from edge_runtime.protocol import wire
from server_hub.hub_status import HubStatus
from server_hub.monitoring.results import RoundRecord

# What devices may report about themselves (edge_runtime.protocol.device_metrics).
DEVICE_METRICS = ("train_seconds", "samples", "max_rss_bytes", "edge_accuracy",
                  "skipped_files")
MAX_HISTORY = 10_000  # rounds kept for the plot (a long run still fits in memory)
INACTIVE = ("silent", "gone", "finished")  # states not counted in devices_active


@dataclass
class DeviceView:
    """What the hub has seen of one device."""

    device: str
    first_seen: float
    last_seen: float
    last_round: int = -1  # last round it sent anything for
    messages: int = 0
    bytes_up: int = 0
    codec: str | None = None
    last_upload: str = ""  # upload_id of its last upload_done (duplicates are acked again)
    reported: dict[str, float] = field(default_factory=dict)
    update: int = -1  # async: its newest merged update
    updated: float | None = None  # async: when that was merged


def clean_report(meta: dict) -> dict[str, float]:
    raw = meta.get("device_metrics")
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k in DEVICE_METRICS:
        v = raw.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = v
    return out


class FleetObserver:
    """Hears every accepted message and finished round; builds the fleet snapshot."""

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.devices: dict[str, DeviceView] = {}
        self.history: list[dict] = []
        self.samples_received = 0
        self.rounds_completed = 0
        self.bytes_total = {"uplink": 0, "downlink": 0}  # over completed rounds, on the wire
        self.started = clock()
        self._lock = threading.Lock()

    # -- called by the service (network thread / main thread) ---------------------------
    def on_accepted(self, device: str, msg: wire.Message, size: int,
                    merged: int | None = None,
                    completed: tuple[str, int] | None = None) -> None:
        """``merged``: async, the device's newest merged update (any kind completes one);
        ``completed``: (upload id, samples) of the upload the device completed, counted once:
        the distinct samples stored, never what its upload_done claims."""
        now = self.clock()
        with self._lock:
            view = self.devices.get(device)
            if view is None:
                view = self.devices[device] = DeviceView(device, now, now)
            view.last_seen = now
            view.messages += 1
            if msg.kind != "hello":
                view.bytes_up += size
                view.last_round = max(view.last_round, msg.round)
            if completed is not None and completed[0] != view.last_upload:
                view.last_upload = completed[0]
                self.samples_received += completed[1]
            if msg.kind in ("hello", "upload_done"):
                view.reported.update(clean_report(msg.meta))
                if msg.kind == "hello" and isinstance(msg.meta.get("codec"), str):
                    view.codec = msg.meta["codec"][:16]
            if merged is not None and merged != view.update:
                view.update, view.updated = merged, now

    def on_round(self, rec: RoundRecord) -> None:
        with self._lock:
            self.rounds_completed += 1
            self.bytes_total["uplink"] += rec.upload_bytes
            self.bytes_total["downlink"] += rec.download_bytes
            self.history.append(asdict(rec))
            del self.history[:-MAX_HISTORY]

    # -- readers (HTTP threads) ----------------------------------------------------------
    def device_views(self) -> dict[str, DeviceView]:
        """Copies of the devices' views, called under the lock (hub workers add the other
        workers' views: server_hub/workers/figures.py)."""
        return {d: DeviceView(**asdict(v)) for d, v in self.devices.items()}

    def device_state(self, status: HubStatus, view: DeviceView, now: float) -> str:
        complete = status.uploads.get(view.device)  # None: no upload this round
        phase = status.phase
        if phase == "done":
            return "finished"
        if phase == "collect":
            if complete:
                return "uploaded"
            if complete is not None:
                return "uploading"
        if phase == "train" and complete:
            return "uploaded"  # the hub trains on it now
        if is_silent(status, view, now):
            return "silent"
        return "training" if phase == "collect" else "waiting"

    def snapshot(self, service) -> dict:
        now = self.clock()
        status: HubStatus = service.status()
        known = status.known
        with self._lock:
            views = self.device_views()
            history = list(self.history)
            samples, completed = self.samples_received, self.rounds_completed
            totals = dict(self.bytes_total)
        slots = status.slots if status.mode == "async" else None
        devices = []
        for d in sorted(set(known) | set(views)):
            v = views.get(d) or DeviceView(d, now, now)
            hello = known.get(d, {})
            if slots is None:
                state, extra = self.device_state(status, v, now), {}
            else:
                slot = slots.get(d)
                state, extra = async_device_state(status, v, slot, now), async_row(v, slot, now)
            devices.append({
                "id": d, "state": state,
                "samples": hello.get("num_samples"), "codec": v.codec,
                "last_seen_s": round(now - v.last_seen, 1), "last_round": v.last_round,
                "messages": v.messages, "bytes_up": v.bytes_up, **v.reported,
                **extra,
            })
        mode = {"mode": "sync"} if slots is None else {
            "mode": "async", "version": status.version, "steps": status.steps,
            "max_updates": status.max_updates}
        return {**mode,
            "time": now, "uptime_s": round(now - self.started, 1),
            "round": status.round, "rounds": status.rounds, "phase": status.phase,
            "rounds_completed": completed, "samples_received": samples,
            "devices_known": len(devices),
            "devices_active": sum(x["state"] not in INACTIVE for x in devices),
            "bytes_received": status.bytes_received, "bytes_sent": status.bytes_sent,
            **round_bytes(history, totals),
            "rejected": status.rejected, "quarantined": status.quarantined,
            "devices": devices, "history": history,
            "class_report": status.class_report, "run_id": status.run_id,
        }


def round_bytes(history: list[dict], totals: dict[str, int]) -> dict:
    """Uplink/downlink bytes of the last completed round and of all of them (what the
    round records count: upload and logits messages as they crossed the wire)."""
    last = history[-1] if history else {}
    return {"uplink_bytes": {"last_round": last.get("upload_bytes"), "total": totals["uplink"]},
            "downlink_bytes": {"last_round": last.get("download_bytes"),
                               "total": totals["downlink"]}}


def is_silent(status: HubStatus, view: DeviceView, now: float) -> bool:
    """Nothing heard from the device for two round deadlines."""
    return now - view.last_seen > 2 * status.round_deadline


def async_device_state(status: HubStatus, view: DeviceView, slot: dict | None,
                       now: float) -> str:
    """uploading | waiting for logits | training (its next local round) | gone | finished."""
    if status.phase == "done":
        return "finished"
    if is_silent(status, view, now):
        return "gone"  # its features age out by the staleness rule; nobody waits for it
    if view.device in status.uploads:  # an upload is removed from there once merged
        return "uploading"
    if slot is not None and slot["awaiting_logits"]:
        return "waiting for logits"
    return "training"


def async_row(view: DeviceView, slot: dict | None, now: float) -> dict:
    """Which update of the device the bank holds, merged at which hub version, how stale."""
    keys = ("update", "version", "staleness", "weight", "bank_samples")
    row = {k: slot[k] for k in keys} if slot else dict.fromkeys(keys)
    row["last_update_s"] = None if view.updated is None else round(now - view.updated, 1)
    return row
