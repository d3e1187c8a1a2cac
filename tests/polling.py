"""Waiting on a condition in tests (no fixed sleeps)."""

from __future__ import annotations

import time


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """True as soon as ``pred()`` is; its last answer once ``timeout`` seconds passed."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
