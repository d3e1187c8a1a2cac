"""The asynchronous hub's rules as pure functions: staleness weights and when logits are due.

Hub version = the number of device uploads merged into the feature bank so far. Features
merged at version v have age ``version - v``; in the server loss they weigh
``decay ** age``, and past ``max_staleness`` they are dropped from training. A device's
newest complete upload replaces its older features. Its logits are due once the server has
taken ``logits_after`` passes over the bank (in steps) since its features arrived.
See docs/async.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MODES = ("sync", "async")


@dataclass(frozen=True)
class AsyncConfig:
    """Async mode's rules: staleness weighting, when logits go out, evaluation, the end."""

    decay: float = 0.95  # weight per hub version of age
    max_staleness: int = 50  # hub versions; older features are not trained on (0 = never drop)
    logits_after: float = 1.0  # passes over the bank between a device's upload and its logits
    eval_every: int = 0  # evaluate every N merged uploads (0: every eval_seconds)
    eval_seconds: float = 10.0
    max_updates: int = 0  # stop after this many merged uploads (0: no limit)
    duration: float = 0.0  # stop after this many seconds (0: no limit)

    def __post_init__(self) -> None:
        if not 0 < self.decay <= 1:
            raise ValueError(f"staleness decay must be in (0, 1], got {self.decay}")
        if self.max_staleness < 0 or self.eval_every < 0 or self.max_updates < 0:
            raise ValueError("max_staleness, eval_every and max_updates must be >= 0")
        if self.logits_after <= 0 or self.eval_seconds <= 0 or self.duration < 0:
            raise ValueError("logits_after and eval_seconds must be > 0, duration >= 0")
        if self.max_updates == 0 and self.duration == 0:
            raise ValueError("an async run needs a stopping rule: max_updates or duration")


def staleness_weight(age: int, decay: float, max_staleness: int) -> float:
    """Loss weight of features ``age`` hub versions old; 0.0 once they are too stale."""
    if age < 0:
        raise ValueError(f"age must be >= 0, got {age}")
    if max_staleness and age > max_staleness:
        return 0.0
    return decay**age


def steps_for(bank_samples: int, batch_size: int, passes: float) -> int:
    """Server steps that make ``passes`` passes over a bank of ``bank_samples``."""
    return max(1, math.ceil(passes * bank_samples / batch_size))


def due_devices(merged_at: Mapping[str, int], steps: int, needed: int) -> list[str]:
    """Devices waiting for logits whose features (merged at step ``merged_at[d]``) have
    since been trained on for at least ``needed`` steps, oldest first."""
    ready = [(s, d) for d, s in merged_at.items() if steps - s >= needed]
    return [d for _, d in sorted(ready)]


def should_evaluate(cfg: AsyncConfig, version: int, last_version: int, now: float,
                    last_time: float) -> bool:
    """True when a new evaluation is due (something new was merged since the last one)."""
    if version == last_version:
        return False
    if cfg.eval_every:
        return version - last_version >= cfg.eval_every
    return now - last_time >= cfg.eval_seconds


def finished(cfg: AsyncConfig, version: int, elapsed: float) -> bool:
    return bool((cfg.max_updates and version >= cfg.max_updates)
                or (cfg.duration and elapsed >= cfg.duration))
