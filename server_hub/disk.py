"""The hub's disk: a warning before the feature maps outgrow it, a clear stop when it fills.

Nearly all the bytes a hub writes are feature maps, twice: the training bank
(``STATE/features``) and the copy held across rounds (``STATE/held``), 16 x S x S float32
each per sample, 128 KB a sample at 32x32. Journals, checkpoints (a few MB) and models are
small beside them. A full disk used to end the hub with a traceback from deep inside a
round, and systemd restarted it into the same wall.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from edge_runtime.protocol.schema import FEATURE_CHANNELS

log = logging.getLogger("gkt.hub")

MAP_COPIES = 2  # the training bank and the held copy


def feature_bytes(samples: int, size: int) -> int:
    """What ``samples`` samples' maps take on the hub's disk at input size ``size``."""
    return samples * FEATURE_CHANNELS * size * size * 4 * MAP_COPIES


def _used(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class DiskRoom:
    """Warns when the devices that joined hold more samples than the state dir's disk can
    keep maps for (once per increase of the sample count)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self._warned_at = 0

    def shortfall(self, samples: int, size: int) -> tuple[int, int] | None:
        """(bytes needed, bytes available) if the maps will not fit, else None."""
        need = feature_bytes(samples, size)
        have = (shutil.disk_usage(self.state_dir).free
                + _used(self.state_dir / "features") + _used(self.state_dir / "held"))
        return (need, have) if need > have else None

    def check(self, samples: int, size: int | None) -> None:
        if not size or samples <= self._warned_at:
            return
        short = self.shortfall(samples, size)
        if short:
            self._warned_at = samples
            log.warning("the %d samples of the devices that joined need about %.1f MB for "
                        "their feature maps in %s, but only %.1f MB are free there: the hub "
                        "will stop when the disk is full (free space, or use a state dir on "
                        "a larger disk)", samples, short[0] / 1e6, self.state_dir,
                        short[1] / 1e6)


# what `serve` says after the disk of its state dir filled (edge_runtime.ops.state_dir)
DISK_FULL_ADVICE = (f"The feature maps need about {feature_bytes(1, 32) // 1024} KB a sample at "
                    "32x32. Free space, then start the hub again: it resumes from its last "
                    "checkpoint")
