"""The calibration state: measured efficiencies per model and batch, in a small JSON file.

``calibrate`` measures them; estimates multiply a device's peak by them. Torch-free.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_ENV = "GKT_PROFILE_STATE"
STATE_VERSION = 1


def default_state_path() -> Path:
    """$GKT_PROFILE_STATE, else $XDG_STATE_HOME (~/.local/state)/gkt-edge-toolkit/..."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "gkt-edge-toolkit" / "profile-calibration.json"


@dataclass(frozen=True)
class CalibrationPoint:
    model: str
    batch: int
    steps: int
    step_seconds: float  # wall time of the timed steps / steps (what an epoch sees)
    train_flops_per_step: int  # FlopCounterMode, 2 flops per multiply-add
    achieved_gflops: float
    efficiency: float  # achieved / peak_gflops


@dataclass(frozen=True)
class Calibration:
    machine: str  # CPU model as /proc/cpuinfo names it
    arch: str
    threads: int
    torch_version: str
    created: str
    peak_gflops: float
    peak_source: str
    matmul_gflops: float
    points: list[CalibrationPoint] = field(default_factory=list)

    def point_for(self, model: str, batch: int) -> tuple[CalibrationPoint, str] | None:
        """The point measured for ``model`` at the batch nearest ``batch`` (log scale)."""
        mine = [p for p in self.points if p.model == model]
        if not mine:
            return None
        best = min(mine, key=lambda p: abs(math.log(p.batch / batch)))
        note = ("" if best.batch == batch
                else f" (calibrated at batch {best.batch}, used for {batch})")
        return best, note


def load_calibration(path: str | Path | None = None) -> Calibration | None:
    """The stored calibration, or None if there is none (a broken file is an error)."""
    path = Path(path) if path else default_state_path()
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != STATE_VERSION:
            raise ValueError(f"version {raw.get('version')!r}, expected {STATE_VERSION}")
        points = [CalibrationPoint(**p) for p in raw["points"]]
        fields_ = {k: v for k, v in raw.items() if k not in ("version", "points")}
        return Calibration(points=points, **fields_)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable calibration ({err}); delete it and run "
                         "`gkt-profile calibrate` again") from None


def save_calibration(cal: Calibration, path: str | Path | None = None) -> Path:
    path = Path(path) if path else default_state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": STATE_VERSION, **asdict(cal)}, indent=1))
    tmp.replace(path)
    return path


