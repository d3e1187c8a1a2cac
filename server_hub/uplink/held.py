"""Each device's latest feature maps, held across rounds, and the epoch that names them.

A device may omit maps the hub holds or send residuals against them, naming the epoch it
builds on (``base``); ``reconstruct`` turns such a chunk into full maps, or raises
``Resync`` when the hub holds another epoch (or not every sample), so the device sends
full maps again. After a round the hub ``commit``s what it trained on under the epoch the
device named in upload_done and reports it in the logits (edge_runtime/device/refresh.py
holds the device's side). With a folder the copy survives hub restarts: a device's epoch
file is removed before its maps are rewritten and written after, so a crash in between
leaves no epoch (the next upload is full), never an epoch over other maps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from edge_runtime.protocol.errors import WireError
from edge_runtime.protocol.messages import FeatureChunk

COPY_ROWS = 1024


class Resync(WireError):
    """The chunk builds on feature maps the hub does not hold."""

    def __init__(self, message: str) -> None:
        super().__init__("resync", message)


class HeldFeatures:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._ids: dict[str, np.ndarray] = {}
        self._maps: dict[str, np.ndarray] = {}
        self.epochs: dict[str, str] = {}
        self._touched: set[str] = set()  # devices sent maps since their last commit
        if self.root is not None and self.root.is_dir():
            for meta in self.root.glob("*.held.json"):
                self._load(meta)

    def epoch(self, device: str) -> str | None:
        return self.epochs.get(device)

    def reconstruct(self, device: str, c: FeatureChunk) -> torch.Tensor:
        """The chunk's full feature maps (float32), built on what the hub holds if needed."""
        if c.complete or (c.rows is None or len(c.rows)):
            self._touched.add(device)
        if c.complete:
            return c.features
        held = self.epochs.get(device)
        if c.base != held:
            raise Resync(f"{device}: chunk builds on feature epoch {c.base}, the hub holds "
                         f"{held}")
        ids = self._ids[device]
        pos = np.searchsorted(ids, c.ids.numpy())
        pos = np.minimum(pos, len(ids) - 1)
        if len(ids) == 0 or not (ids[pos] == c.ids.numpy()).all():
            raise Resync(f"{device}: chunk names samples the hub holds no maps for")
        out = np.array(self._maps[device][pos], dtype=np.float32)
        if c.rows is not None and len(c.rows) == 0:
            return torch.from_numpy(out)
        rows = c.rows if c.rows is not None else np.arange(len(out))
        sent = c.features.numpy()
        if sent.shape[1:] != out.shape[1:]:
            raise WireError("shape", f"{device}: maps {list(sent.shape[1:])}, the hub holds "
                                     f"{list(out.shape[1:])}")
        out[rows] = out[rows] + sent if c.residual else sent
        return torch.from_numpy(out)

    def commit(self, device: str, ids: torch.Tensor, features: torch.Tensor,
               epoch: str | None) -> None:
        """The device's maps become ``features`` (sorted ``ids``), named ``epoch``."""
        ids_np = ids.numpy().astype(np.int64)
        same = device not in self._touched and np.array_equal(self._ids.get(device), ids_np)
        self._touched.discard(device)
        if same and self.root is not None and device in self.epochs:  # maps as held
            if epoch is not None:
                self._write_epoch(device, epoch, tuple(features.shape))
            else:
                (self.root / f"{device}.held.json").unlink(missing_ok=True)
        elif self.root is None:
            self._ids[device] = ids_np.copy()
            self._maps[device] = features.numpy().astype(np.float32, copy=True)
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            meta = self.root / f"{device}.held.json"
            meta.unlink(missing_ok=True)
            self._maps.pop(device, None)
            path = self.root / f"{device}.maps"
            tmp = path.with_suffix(".tmp")
            src = features.numpy()
            with open(tmp, "wb") as f:
                for s in range(0, len(src), COPY_ROWS):
                    f.write(np.ascontiguousarray(src[s:s + COPY_ROWS], dtype=np.float32))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
            np.save(self.root / f"{device}.ids.npy", ids_np)
            self._ids[device] = ids_np
            self._maps[device] = self._map(path, (len(ids_np), *src.shape[1:]))
            if epoch is not None:
                self._write_epoch(device, epoch, src.shape)
        if epoch is None:
            self.epochs.pop(device, None)
        else:
            self.epochs[device] = epoch

    def _write_epoch(self, device: str, epoch: str, shape: tuple[int, ...]) -> None:
        meta = self.root / f"{device}.held.json"
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "shape": list(shape)}))
        tmp.replace(meta)

    def _map(self, path: Path, shape: tuple[int, ...]) -> np.ndarray:
        if shape[0] == 0:
            return np.empty(shape, np.float32)
        return np.memmap(path, np.float32, "r", shape=shape)

    def _load(self, meta: Path) -> None:
        device = meta.name[:-len(".held.json")]
        try:
            info = json.loads(meta.read_text())
            ids = np.load(self.root / f"{device}.ids.npy")
            shape = tuple(int(d) for d in info["shape"])
            if shape[0] != len(ids) or (self.root / f"{device}.maps").stat().st_size != (
                    4 * int(np.prod(shape))):
                raise ValueError("size mismatch")
            self._maps[device] = self._map(self.root / f"{device}.maps", shape)
            self._ids[device] = ids.astype(np.int64)
            self.epochs[device] = str(info["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            meta.unlink(missing_ok=True)  # unusable: its device re-sends full maps
