"""What a restarted async hub needs besides its checkpoint and upload journal.

The journal holds each device's newest complete upload, so a restart rebuilds the bank;
this small file keeps the counters the journal cannot: the hub version (uploads merged so
far, which also decides when the run stops), the version each device's newest upload was
merged at (its staleness), and the hello of each device already acted on (a broker
re-delivers retained hellos to a new subscriber, and an old one must not read as "this
device lost its state"). Written atomically after every merge and every new hello; see
docs/async.md.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("gkt.hub")
FILE = "async-state.json"


@dataclass
class AsyncState:
    """The counters a restarted async hub needs (hub version, slots, hellos acted on)."""

    version: int = 0
    slots: dict[str, tuple[int, int]] = field(default_factory=dict)  # device -> (update, version)
    hellos: dict[str, str] = field(default_factory=dict)  # device -> msg_id acted on


def _valid(raw: object) -> AsyncState:
    if not isinstance(raw, dict) or not isinstance(raw.get("version"), int):
        raise ValueError("no integer 'version'")
    slots, hellos = raw.get("slots", {}), raw.get("hellos", {})
    if not (isinstance(slots, dict) and isinstance(hellos, dict)):
        raise ValueError("'slots' and 'hellos' must be objects")
    out = AsyncState(raw["version"])
    for d, s in slots.items():
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s)):
            raise ValueError(f"slot of {d!r} is not [update, version]")
        out.slots[str(d)] = (s[0], s[1])
    out.hellos = {str(d): str(m) for d, m in hellos.items()}
    return out


def load_state(state_dir: str | Path) -> AsyncState | None:
    """The saved state, or None if there is none (a first start) or it is unusable (then
    the hub recounts from its journal, logged)."""
    path = Path(state_dir) / FILE
    if not path.exists():
        return None
    try:
        return _valid(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        log.warning("ignoring %s (%s): hub version recounted from the journal", path, err)
        return None


def save_state(state_dir: str | Path, state: AsyncState) -> None:
    path = Path(state_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": state.version, "slots": {d: list(s) for d, s in
                                                       state.slots.items()},
                   "hellos": state.hellos}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
