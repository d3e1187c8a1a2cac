"""What a device reports about itself to the hub (in hello and upload_done meta).

The hub exports these as Prometheus gauges labelled by device (server_hub.monitoring.metrics); the
names must match server_hub.monitoring.snapshot.DEVICE_METRICS.
"""

from __future__ import annotations

import resource
import sys


def max_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def device_metrics(samples: int, train_seconds: float | None = None,
                   edge_accuracy: float | None = None,
                   skipped_files: int | None = None) -> dict[str, float]:
    """``skipped_files``: own-data files the device could not use (unreadable, not an
    image, unknown label); None on the academic datasets."""
    out: dict[str, float] = {"samples": samples, "max_rss_bytes": max_rss_bytes()}
    if skipped_files is not None:
        out["skipped_files"] = skipped_files
    if train_seconds is not None:
        out["train_seconds"] = round(train_seconds, 4)
    if edge_accuracy is not None:
        out["edge_accuracy"] = edge_accuracy
    return out
