"""`gkt-edge fetch-model`: ask the hub for this device's current composed model.

The hub answers a ``model_request`` with the model of its latest checkpoint (exporting it
first if needed), in the same chunked, checksummed ``model`` messages as at the end of a
run; the ``ModelReceiver`` stores and acknowledges it exactly as ``gkt-edge run`` does.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from edge_runtime.device.model_store import ModelReceiver
from edge_runtime.protocol import topics, wire
from edge_runtime.protocol.model_transfer import request_message

log = logging.getLogger("gkt.edge")


def fetch_model(link, device_id: str, state_dir: Path, timeout: float,
                max_bytes: int) -> dict[str, tuple[int, Path]]:
    """variant -> (round, path) stored; empty if nothing complete arrived within ``timeout``."""
    receiver = ModelReceiver(link, device_id, state_dir)

    def on_down(topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            msg = wire.decode_message(payload, max_bytes=max_bytes)
            if msg.kind == "model":
                receiver.on_model(msg)
        except (wire.WireError, OSError) as err:
            log.warning("rejected message on %s: %s", topic, err)

    link.subscribe(topics.down(device_id), on_down)
    # the model topic reaches the hub that delivers (with hub workers, rank 0; ``up`` goes
    # to any worker)
    link.publish(topics.model(device_id), request_message(device_id, uuid.uuid4().hex[:8]))
    receiver.wait_complete(timeout)
    return dict(receiver.stored)
