"""torch.distributed plumbing for hub workers: the process group and the merges that keep
every worker's view of a round the same.

Workers agree through collectives only (``all_gather_object``, ``broadcast_object_list``):
each contributes what reached it over MQTT, and every worker computes the same merge.
Objects travel pickled between the hub's own workers, never from the network side, so the
process group's port must be reachable only by them (as with any torchrun job).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(backend: str, init_method: str = "env://", rank: int | None = None,
               world_size: int | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group (torchrun's RANK/WORLD_SIZE/MASTER_* by default); (rank, world)."""
    kw: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
    if rank is not None:
        kw.update(rank=rank, world_size=world_size)
    dist.init_process_group(backend, init_method=init_method, **kw)
    return dist.get_rank(), dist.get_world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src``, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@dataclass(frozen=True)
class MergedUpload:
    """A device's upload as all workers together hold it."""

    upload_id: str
    bytes: int
    edge_accuracy: float | None


def merge_uploads(views: list[dict[str, dict]]) -> tuple[dict[str, MergedUpload], int]:
    """Per-rank upload views (device -> Upload fields) -> (complete devices, bytes in).

    With a shared subscription one device's chunks, extractor and upload_done may land on
    different workers: an upload is complete when, for one upload id, the union over ranks
    has every chunk, an extractor and the upload_done. Should a restarted device have two
    complete uploads in one round, every rank picks the same one (the last id in order).
    """
    groups: dict[tuple[str, str], dict] = {}
    for view in views:
        for device, u in view.items():
            g = groups.setdefault((device, u["upload_id"]), {
                "chunks": set(), "expected": set(), "extractor": False, "done": False,
                "bytes": 0, "acc": None})
            g["chunks"] |= set(u["chunks"])
            if u["expected"] is not None:
                g["expected"].add(u["expected"])
            g["extractor"] |= u["extractor"]
            g["done"] |= u["done"]
            g["bytes"] += u["bytes"]
            if u["edge_accuracy"] is not None:
                g["acc"] = u["edge_accuracy"]
    complete: dict[str, MergedUpload] = {}
    for (device, upload_id), g in sorted(groups.items()):
        ok = (g["done"] and g["extractor"] and len(g["expected"]) == 1
              and len(g["chunks"]) == next(iter(g["expected"])))
        if ok:
            complete[device] = MergedUpload(upload_id, g["bytes"], g["acc"])
    return complete, sum(g["bytes"] for g in groups.values())


def owned_mask(ids_by_rank: list[dict[str, np.ndarray]], rank: int, device: str) -> np.ndarray:
    """Which of ``rank``'s samples of ``device`` it trains on: those no lower rank holds.
    A resent chunk can reach two workers; each sample must be trained on once."""
    mine = ids_by_rank[rank].get(device, np.empty(0, np.int64))
    lower = [v[device] for v in ids_by_rank[:rank] if device in v]
    if not lower:
        return np.ones(len(mine), dtype=bool)
    return ~np.isin(mine, np.concatenate(lower))

