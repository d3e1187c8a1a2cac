"""Acknowledged, windowed sending over an ``MqttLink``: delivery rests on application acks
and retries, since a broker restart can drop or duplicate messages even at QoS 1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

from edge_runtime.mqtt.link import MqttLink


class SendCancelled(Exception):
    """ReliableSender.send() was cancelled (the owner is stopping)."""


@dataclass
class SendStats:
    messages: int = 0  # distinct messages sent
    acked: int = 0
    bytes: int = 0  # payload bytes of first transmissions
    retransmits: int = 0
    max_outstanding: int = 0  # most messages sent and not yet acknowledged at once


class ReliableSender:
    """Send (msg_id, payload) pairs to one topic at QoS 1 with at most ``window`` of them
    unacknowledged, resending one not acknowledged within ``ack_timeout`` (doubling each
    time, up to ``max_backoff`` times it), and giving up with TimeoutError once ``deadline``
    seconds have passed.

    The owner parses application-level acknowledgements and calls ``ack(msg_id)``, from
    any thread (typically a message handler). Receivers must be idempotent: a message
    whose ack was lost is sent again. ``on_progress(stats)`` runs on the sending thread.
    """

    def __init__(self, link: MqttLink, topic: str, window: int = 8, ack_timeout: float = 5.0,
                 deadline: float = 600.0,
                 on_progress: Callable[[SendStats], None] | None = None,
                 max_backoff: float = 8.0) -> None:
        if window < 1 or ack_timeout <= 0 or deadline <= 0:
            raise ValueError("window must be >= 1, ack_timeout and deadline > 0")
        self.link, self.topic = link, topic
        self.window, self.ack_timeout, self.deadline = window, ack_timeout, deadline
        self.max_backoff = max_backoff
        self.on_progress = on_progress
        self.stats = SendStats()
        self._pending: dict[str, _Pending] = {}
        self._cond = threading.Condition()
        self._cancelled = False

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def cancel(self) -> None:
        """Make a running send() raise SendCancelled (from any thread)."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def ack(self, msg_id: str) -> None:
        with self._cond:
            if self._pending.pop(msg_id, None) is not None:
                self.stats.acked += 1
                self._cond.notify_all()

    def send(self, items: Iterable[tuple[str, bytes]]) -> SendStats:
        """Send every item (pulled lazily, as the window opens) and return once all are
        acknowledged; TimeoutError at the deadline."""
        it = iter(items)
        exhausted = False
        t_end = time.monotonic() + self.deadline
        with self._cond:
            self._pending.clear()
            self.stats = SendStats()
        reported = 0
        while True:
            # Decide under the lock; produce and publish outside it, so acks (from the
            # network thread) never wait for an encoder or for paho.
            room, due = self._next_work(exhausted, t_end, reported)
            if self.on_progress and self.stats.acked != reported:
                self.on_progress(self.stats)
            reported = self.stats.acked
            if exhausted and not self._pending:
                return self.stats
            for msg_id, p in due:
                self._resend(msg_id, p)
            if room:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                else:
                    self._send_new(*nxt)

    def _next_work(self, exhausted: bool, t_end: float,
                   reported: int) -> tuple[bool, list[tuple[str, _Pending]]]:
        """Wait until the window has room, a resend is due, an ack came or all are done;
        return (room, due)."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._cancelled:
                    raise SendCancelled(f"sending to {self.topic} cancelled "
                                        f"({self.stats.acked} of {self.stats.messages} acked)")
                if exhausted and not self._pending:
                    return False, []
                if now > t_end:
                    raise TimeoutError(
                        f"{len(self._pending)} messages to {self.topic} not acknowledged "
                        f"within {self.deadline:g}s ({self.stats.acked} of "
                        f"{self.stats.messages} were)")
                room = not exhausted and len(self._pending) < self.window
                due = [(k, p) for k, p in self._pending.items() if p.due <= now]
                if room or due or self.stats.acked != reported:
                    return room, due
                next_due = min(p.due for p in self._pending.values())
                self._cond.wait(min(next_due, t_end) - now + 0.001)

    def _send_new(self, msg_id: str, payload: bytes) -> None:
        with self._cond:
            # Registered before publishing: the ack may come back before publish returns.
            self._pending[msg_id] = _Pending(payload, time.monotonic() + self.ack_timeout)
            self.stats.messages += 1
            self.stats.bytes += len(payload)
            self.stats.max_outstanding = max(self.stats.max_outstanding, len(self._pending))
        self.link.publish(self.topic, payload, wait=False)
        if self.on_progress:
            self.on_progress(self.stats)

    def _resend(self, msg_id: str, p: _Pending) -> None:
        with self._cond:
            if msg_id not in self._pending:
                return  # acked meanwhile
            p.tries += 1
            p.due = time.monotonic() + self.ack_timeout * min(2.0 ** (p.tries - 1),
                                                               self.max_backoff)
        if self.link.connected:  # otherwise paho resends its own copy on reconnect
            self.link.publish(self.topic, p.payload, wait=False)
            with self._cond:
                self.stats.retransmits += 1


@dataclass
class _Pending:
    payload: bytes
    due: float  # when to resend if still unacknowledged
    tries: int = 1
