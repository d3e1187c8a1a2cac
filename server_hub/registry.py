"""The hub's device registry, kept in its state dir (``registry.json``).

Retained hellos on the broker are a convenience, not the record: anyone who may publish on
a device's up topic can clear them (an empty retained message), and a broker killed before
its autosave loses them. A restarted hub therefore takes its devices from this file, so a
cleared hello does not make it forget them, and its journal replays. The file also pins
the run id and the feature size the run settled on.

Which devices a round waits for: those that uploaded in one of the last ``WAIT_ROUNDS``
rounds, and new ones until they have missed one round. A device that says hello and never
uploads (a phantom) holds up at most the first round it could take part in, by at most
the round deadline; after that the round goes on as soon as the others are in.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

WAIT_ROUNDS = 2
FILE = "registry.json"


class DeviceRegistry:
    def __init__(self, state_dir: str | Path, run_id: str = "") -> None:
        self.path = Path(state_dir) / FILE
        self._lock = threading.Lock()
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.run_id: str = run_id or data.get("run_id") or f"run-{uuid.uuid4().hex[:12]}"
        self.feature_size: int | None = data.get("feature_size")
        # device -> {"hello": meta, "joined": round it joined in, "uploaded": last round}
        self.devices: dict[str, dict] = data.get("devices", {})
        self._save()

    def __contains__(self, device: str) -> bool:
        return device in self.devices

    def __len__(self) -> int:
        return len(self.devices)

    def hello(self, device: str, meta: dict, round_: int) -> bool:
        """Record a hello; True if the device is new."""
        with self._lock:
            entry = self.devices.get(device)
            new = entry is None
            if new:
                entry = self.devices[device] = {"joined": round_, "uploaded": None}
            if entry.get("hello") != meta:
                entry["hello"] = dict(meta)
                self._save()
            return new

    def hello_meta(self, device: str) -> dict:
        return self.devices.get(device, {}).get("hello", {})

    def uploaded(self, devices: list[str], round_: int) -> None:
        """Round ``round_`` trained on ``devices`` (one write per round)."""
        with self._lock:
            for device in devices:
                entry = self.devices.setdefault(device, {"joined": round_, "hello": {}})
                entry["uploaded"] = round_
            self._save()

    def settle_feature_size(self, size: int) -> None:
        with self._lock:
            if self.feature_size is None:
                self.feature_size = size
                self._save()

    def waited_for(self, round_: int) -> set[str]:
        """Devices round ``round_`` waits for before its deadline."""
        out = set()
        for device, e in self.devices.items():
            last = e.get("uploaded")
            if last is not None and round_ - last <= WAIT_ROUNDS:
                out.add(device)
            elif last is None and round_ - max(e.get("joined", round_), 0) < 1:
                out.add(device)
        return out

    def _save(self) -> None:
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")  # workers share the dir
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"run_id": self.run_id, "feature_size": self.feature_size,
                                   "devices": self.devices}, indent=1))
        os.replace(tmp, self.path)
