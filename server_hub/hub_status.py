"""What monitoring reads of a running hub: ``status()`` of every service kind (sync,
async, hub worker) returns a ``HubStatus``; the status page, Prometheus, `gkt-hub status`
and serve's closing line read it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HubStatus:
    """What monitoring reads of a running service (``status()`` of any service kind)."""

    mode: str  # sync | async
    round: int  # sync: the round; async: evaluations so far
    rounds: int
    phase: str
    round_deadline: float
    known: dict[str, dict]  # device -> its hello
    uploads: dict[str, bool]  # device -> its open upload is complete
    rejected: dict[str, int]
    bytes_received: int
    bytes_sent: int
    version: int | None = None  # async: the hub version
    steps: int | None = None
    max_updates: int | None = None
    slots: dict | None = None  # async: AsyncHub.summary()
    class_report: dict | None = None  # the last evaluation's (server_hub/run/evaluation.py)
    run_id: str | None = None  # the announced run spec's
    quarantined: dict[str, int] = field(default_factory=dict)  # uploads left out, by reason
    rows: dict[str, int] = field(default_factory=dict)  # device -> distinct samples stored
    delivery: dict | None = None  # the end-of-run model delivery's report
