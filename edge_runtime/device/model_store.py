"""The models the hub delivers, kept in the device's state dir, newest round only.

    STATE_DIR/model/composed-r0007.onnx        extractor + server, fp32
    STATE_DIR/model/composed-r0007.int8.onnx   the same, int8 QDQ

Each file is written under a temporary name and renamed into place, so a reader sees an
old model or a new one, never part of one; a newer round's file replaces the older one
of the same variant, and an older round never replaces a newer one. The round, run id,
classes and preprocessing travel inside the file (ONNX metadata), so a file is
self-describing wherever it is copied.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.model_transfer import ModelAssembler, ModelFile, ack_message

log = logging.getLogger("gkt.edge")

MODEL_DIR = "model"
_NAME = re.compile(r"composed-r(\d{4,})(\.int8)?\.onnx")


def model_path(state_dir: Path, round_: int, variant: str) -> Path:
    suffix = ".int8.onnx" if variant == "int8" else ".onnx"
    return Path(state_dir) / MODEL_DIR / f"composed-r{round_:04d}{suffix}"


def stored_models(state_dir: Path, variant: str) -> dict[int, Path]:
    """round -> file of ``variant`` in the state dir."""
    folder = Path(state_dir) / MODEL_DIR
    out = {}
    for p in folder.glob("composed-r*.onnx") if folder.is_dir() else ():
        m = _NAME.fullmatch(p.name)
        if m and (m.group(2) is not None) == (variant == "int8"):
            out[int(m.group(1))] = p
    return out


def current_model(state_dir: Path, variant: str = "fp32") -> Path | None:
    """The newest delivered model of ``variant``, or None."""
    found = stored_models(state_dir, variant)
    return found[max(found)] if found else None


def store_model(state_dir: Path, model: ModelFile) -> Path | None:
    """Keep ``model`` unless a model of a later round is already there (None then)."""
    have = stored_models(state_dir, model.variant)
    if have and max(have) > model.round:
        return None
    target = model_path(state_dir, model.round, model.variant)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(model.data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(target)
    for rnd, old in have.items():
        if rnd < model.round:
            old.unlink(missing_ok=True)
    return target


class ModelReceiver:
    """Assembles ``model`` messages (on the network thread), stores and acknowledges them.

    Storing on the network thread: the files are a few MB and the main thread may be
    training for minutes, so a model arriving mid-round is kept without waiting for it.
    """

    def __init__(self, link, device_id: str, state_dir: Path) -> None:
        self.link = link
        self.device_id = device_id
        self.state_dir = Path(state_dir)
        self._asm = ModelAssembler()
        self._lock = threading.Condition()
        self.stored: dict[str, tuple[int, Path]] = {}  # variant -> (round, path) this session
        self.offered: dict[int, tuple[str, ...]] = {}  # round -> variants the hub sends

    def on_model(self, msg: wire.Message) -> Path | None:
        """WireError for a chunk that does not validate or a file whose checksum fails."""
        variants = msg.meta.get("variants")
        if isinstance(variants, list) and all(isinstance(v, str) for v in variants):
            with self._lock:
                self.offered[msg.round] = tuple(variants)
        model = self._asm.add(msg)
        if model is None:
            return None
        path = store_model(self.state_dir, model)
        if path is None:
            log.info("%s: ignored a round %d %s model: a later one is stored", self.device_id,
                     model.round, model.variant)
        else:
            log.info("%s: stored the round %d %s model (%d bytes) at %s", self.device_id,
                     model.round, model.variant, len(model.data), path)
        # on the model topic: only the hub that delivers (one hub, or rank 0 of hub
        # workers) reads it; ``up`` may go to any worker
        self.link.publish(topics.model(self.device_id), ack_message(self.device_id, model),
                          wait=False)
        with self._lock:
            if path is not None:
                self.stored[model.variant] = (model.round, path)
            self._lock.notify_all()
        return path

    def wait_complete(self, timeout: float) -> bool:
        """Wait until every variant the hub offered for a round is stored (or ``timeout``)."""
        with self._lock:
            return self._lock.wait_for(self._complete, timeout)

    def _complete(self) -> bool:
        for rnd, variants in self.offered.items():
            if variants and all(self.stored.get(v, (-1,))[0] == rnd for v in variants):
                return True
        return False
