"""A device adopts the hub's run spec (edge_runtime/protocol/run_spec.py).

``RunSpecWatch`` keeps the newest valid spec from the retained topic; a device waits for
it before it builds its model, so classes, initial weights, input and training settings
are the hub's. A state dir remembers the spec it was saved under (``run_spec.json``), and
one saved under another run is refused: its model and logits belong to that run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from edge_runtime.device.edge_device import DeviceStateError
from edge_runtime.learning.train import EdgeTrainConfig
from edge_runtime.ops.state_dir import OWNER_FILE, archive_run
from edge_runtime.protocol import topics
from edge_runtime.protocol.run_spec import RunSpec, RunSpecError, decode_run_spec

log = logging.getLogger("gkt.edge")
SPEC_FILE = "run_spec.json"
CATALOG_FILE = "own-data.sqlite"  # decoded images, by content: they outlive a run


class RunSpecMismatch(DeviceStateError):
    """The state dir was saved under another run spec (exit 2: a restart cannot help)."""


class RunSpecWatch:
    """The newest valid run spec on ``topics.RUN_TOPIC``; invalid ones are logged, counted
    and ignored."""

    def __init__(self, link) -> None:
        self.link = link
        self.spec: RunSpec | None = None
        self.rejected = 0
        self._got = threading.Event()

    def start(self) -> None:
        self.link.subscribe(topics.RUN_TOPIC, self._on_spec)

    def _on_spec(self, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared retained message
            return
        try:
            spec = decode_run_spec(payload)
        except RunSpecError as err:
            self.rejected += 1
            log.warning("rejected run spec on %s: %s", topic, err)
            return
        self.spec = spec
        self._got.set()

    def wait(self, stop: threading.Event) -> RunSpec | None:
        """The spec once one arrives; None if ``stop`` is set first."""
        if not self._got.is_set():
            log.info("waiting for the hub's run spec on %s", topics.RUN_TOPIC)
        while not self._got.wait(timeout=0.5):
            if stop.is_set():
                return None
        return self.spec

    def moved_from(self, adopted: RunSpec) -> list[str]:
        """What changed if the hub now announces another run (empty: the same run)."""
        spec = self.spec
        return [] if spec is None else adopted.differences(spec)


def adopt_state_dir(state_dir: Path, spec: RunSpec, new_run: bool = False) -> None:
    """Record ``spec`` in ``state_dir``; RunSpecMismatch if the dir holds another run
    (with ``new_run``, that run's files move to ``state_dir/runs/RUN_ID`` instead)."""
    path = state_dir / SPEC_FILE
    advice = (f"Its model and logits belong to that run: start again with --new-run to keep "
              f"them under {state_dir / 'runs'} and join run {spec.run_id} (the decoded "
              f"images are kept), or give another --state-dir")
    old = None
    if path.exists():
        try:
            saved = decode_run_spec(path.read_bytes())
        except (RunSpecError, OSError) as err:
            if not new_run:
                raise RunSpecMismatch(f"{path} cannot be read ({err}). {advice}") from None
            saved = None
        diffs = saved.differences(spec) if saved else ["unreadable run spec"]
        if diffs and not new_run:
            raise RunSpecMismatch(f"{state_dir} was saved under run {saved.run_id}; the hub "
                                  f"now runs {spec.run_id} ({'; '.join(diffs)}). {advice}")
        old = (saved.run_id if saved else "unknown") if diffs else None
    elif (state_dir / "progress.json").exists():
        if not new_run:
            raise RunSpecMismatch(f"{state_dir} holds a device state saved before this "
                                  f"device knew run specs, so its run is unknown. {advice}")
        old = "unknown"
    if old is not None:
        keep = frozenset(p.name for p in state_dir.iterdir()
                         if p.name == OWNER_FILE or p.name.startswith(CATALOG_FILE))
        dest = archive_run(state_dir, old, keep)
        log.warning("%s: run %s's state moved to %s; joining run %s", state_dir, old, dest,
                    spec.run_id)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(SPEC_FILE + ".tmp")
    tmp.write_bytes(spec.to_json())
    tmp.replace(path)


def edge_config(spec: RunSpec, extract_backend: str = "folded",
                precision: str = "fp32") -> EdgeTrainConfig:
    """The spec's training settings plus the device's own speed choices."""
    return EdgeTrainConfig(spec.epochs, spec.batch_size, spec.lr,
                           weight_decay=spec.weight_decay, temperature=spec.temperature,
                           alpha=spec.alpha, extract_backend=extract_backend,
                           precision=precision)


def pick_codec(spec: RunSpec, requested: str | None) -> str:
    """The device's --codec if the run allows it, else the run's (ValueError if not allowed)."""
    if requested is None:
        return spec.codec
    if requested not in spec.codecs:
        raise ValueError(f"--codec {requested}: run {spec.run_id} allows only "
                         f"{', '.join(spec.codecs)}")
    return requested
