"""Accepted uploads on disk, so a hub that crashes mid-round loses nothing it acked.

Every message the hub accepts is written (atomically, before its ack goes out) as the
exact bytes that arrived, under ``uploads/round-NNNN/<device>/<seq>.msg``. A restarted
hub replays them through the same validation as live traffic; a finished round's
folder is deleted once its checkpoint is written. The bytes are the compressed wire
form, so the journal costs about what crossed the network.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


class UploadJournal:
    """Accepted upload messages on disk, per round and device, so a crashed hub
    replays them instead of asking devices to upload again."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._seq = itertools.count()

    def _dir(self, rnd: int) -> Path:
        return self.root / f"round-{rnd:04d}"

    def record(self, rnd: int, device: str, payload: bytes) -> None:
        folder = self._dir(rnd) / device
        folder.mkdir(parents=True, exist_ok=True)
        seq = next(self._seq)
        tmp = folder / f".{seq:09d}.tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(folder / f"{os.getpid()}-{seq:09d}.msg")

    def replay(self, rnd: int) -> Iterator[tuple[str, bytes]]:
        """(device, payload) in the order they were accepted, per device."""
        base = self._dir(rnd)
        if not base.is_dir():
            return
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            files = sorted(folder.glob("*.msg"), key=lambda p: (p.stat().st_mtime_ns, p.name))
            for f in files:
                yield folder.name, f.read_bytes()

    def rounds(self) -> list[int]:
        """Round (async: upload) numbers that have something on disk, ascending."""
        if not self.root.is_dir():
            return []
        return sorted(int(d.name.split("-")[1]) for d in self.root.glob("round-*")
                      if next(d.glob("*/*.msg"), None) is not None)

    def drop(self, upto: int) -> None:
        """Delete the journal of every round <= ``upto``."""
        if not self.root.is_dir():
            return
        for d in self.root.glob("round-*"):
            if int(d.name.split("-")[1]) <= upto:
                shutil.rmtree(d, ignore_errors=True)

    def drop_device(self, rnd: int, device: str) -> None:
        shutil.rmtree(self._dir(rnd) / device, ignore_errors=True)
