"""Per-round records of a federation run, its JSON form and its terminal table."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RoundRecord:
    """One round's (async: one evaluation's) figures, as printed, plotted and saved."""

    round: int
    test_accuracy: float  # mean over devices of extractor_k + server (GKT), or global model
    upload_bytes: int  # what the devices sent this round
    download_bytes: int  # what the devices received this round
    seconds: float  # wall-clock time of the round
    edge_accuracy: float | None = None  # mean of the devices' own local classifiers (GKT)
    train_loss: float | None = None
    elapsed: float | None = None  # seconds since the run started (the time axis of plots)
    updates: int | None = None  # async: device uploads merged into the bank so far
    per_class_accuracy: list[float | None] | None = None  # in the run's class order


@dataclass
class RunResult:
    """A whole run: its configuration and round records (``--json``)."""

    algorithm: str
    dataset: str
    devices: int
    config: dict
    rounds: list[RoundRecord] = field(default_factory=list)
    evaluation: str = "hub-side: each device's extractor weights + the server model on test data"
    transport: str = "inproc"
    codec: str = "fp32 (raw, counted not sent)"
    broker_bytes: dict | None = None  # bytes that actually crossed the broker (MQTT runs)
    mode: str = "sync"  # sync rounds, or async (a record per evaluation; docs/async.md)
    # the last evaluation's classes, per-class accuracy and confusion matrix
    # (server_hub/run/evaluation.py class_report)
    class_report: dict | None = None
    run_spec: dict | None = None  # what the devices adopted (edge_runtime/protocol/run_spec.py)
    delivery: dict | None = None  # the end-of-run model delivery (server_hub/delivery/models.py)

    def final(self) -> dict:
        last = self.rounds[-1] if self.rounds else None
        return {
            "test_accuracy": last.test_accuracy if last else 0.0,
            "edge_accuracy": last.edge_accuracy if last else None,
            "upload_bytes": sum(r.upload_bytes for r in self.rounds),
            "download_bytes": sum(r.download_bytes for r in self.rounds),
            "seconds": round(sum(r.seconds for r in self.rounds), 3),
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["final"] = self.final()
        d["bytes"] = byte_series(self.rounds)
        return d

    def write_json(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))


def byte_series(rounds: list[RoundRecord]) -> dict[str, list[int]]:
    """Uplink and downlink bytes per round and cumulative, as they crossed the wire."""
    up = [r.upload_bytes for r in rounds]
    down = [r.download_bytes for r in rounds]
    return {"uplink_per_round": up, "downlink_per_round": down,
            "uplink_cumulative": list(itertools.accumulate(up)),
            "downlink_cumulative": list(itertools.accumulate(down))}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


HEADER = (f"{'round':>5}  {'test acc':>8}  {'edge acc':>8}  {'upload':>9}  {'download':>9}  "
          f"{'sec':>6}")


def format_row(r: RoundRecord) -> str:
    edge = f"{r.edge_accuracy:8.4f}" if r.edge_accuracy is not None else f"{'-':>8}"
    return (f"{r.round:5d}  {r.test_accuracy:8.4f}  {edge}  {human_bytes(r.upload_bytes):>9}  "
            f"{human_bytes(r.download_bytes):>9}  {r.seconds:6.1f}")
