"""Simulated device speed: make this machine behave like a slower device on a slower link.

A device with speed factor ``f`` takes ``f`` times the compute time measured here (it
sleeps ``(f - 1) * measured`` after each piece of work), and a link of ``bandwidth``
bytes/s holds each message for ``bytes / bandwidth`` seconds. So one machine can host a
slow Pi on Wi-Fi next to a fast Jetson on Ethernet, in both sync and async modes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")
_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}


@dataclass(frozen=True)
class DeviceSpeed:
    """A simulated device's slowdown of compute and its link's bandwidth."""

    compute: float = 1.0  # slowdown factor against this machine: 5 = five times slower
    bandwidth: float = 0.0  # link bytes/s, each way; 0 = not throttled

    def __post_init__(self) -> None:
        if not self.compute >= 1.0:
            raise ValueError(f"speed factor must be >= 1 (1 = this machine), got {self.compute}")
        if not self.bandwidth >= 0:
            raise ValueError(f"bandwidth must be >= 0 bytes/s, got {self.bandwidth}")


def parse_bandwidth(text: str) -> float:
    """'2.5M' -> 2.5e6 bytes/s (decimal K/M/G suffixes; 0 = unthrottled)."""
    s = text.strip().upper().removesuffix("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    try:
        value = float(s[: len(s) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"bandwidth {text!r} is not a number of bytes/s like 500K, 2M") from None
    if value < 0:
        raise ValueError(f"bandwidth {text!r} is negative")
    return value


def compute_delay(measured_s: float, factor: float) -> float:
    """Extra seconds a ``factor``-times slower device would have spent on this work."""
    return max(0.0, (factor - 1.0) * measured_s)


def transfer_delay(nbytes: int, bandwidth: float) -> float:
    return nbytes / bandwidth if bandwidth > 0 else 0.0


class Throttle:
    """Sleeps to match a DeviceSpeed; ``stop`` cuts a sleep short (a device shutting down)."""

    def __init__(self, speed: DeviceSpeed, stop: threading.Event | None = None) -> None:
        self.speed = speed
        self._stop = stop or threading.Event()
        self.slept = 0.0  # seconds added in all, for reports

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.slept += seconds
            self._stop.wait(seconds)

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` and then stretch its measured time by the speed factor."""
        t0 = time.perf_counter()
        out = fn()
        self.after(time.perf_counter() - t0)
        return out

    def after(self, measured_s: float) -> None:
        self._sleep(compute_delay(measured_s, self.speed.compute))

    def transfer(self, nbytes: int) -> None:
        self._sleep(transfer_delay(nbytes, self.speed.bandwidth))
