"""The error every decoder raises for input it will not accept."""

from __future__ import annotations


class WireError(ValueError):
    """A message was rejected. ``reason`` is a short code used for logs and counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
