"""The hub's run spec: built once from the command line, kept in the state dir so that a
restarted hub announces the same run id, and published retained for devices to adopt."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from edge_runtime.protocol import topics
from edge_runtime.protocol.run_spec import IDENTITY, RunSpec, RunSpecError, decode_run_spec

log = logging.getLogger("gkt.hub")
SPEC_FILE = "run_spec.json"
SETTINGS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "temperature", "alpha",
            "codec", "codecs", "refresh", "logits_codec", "device_logits",
            "round_deadline", "upload_deadline")


class RunSpecConflict(ValueError):
    """The state dir holds another run (other classes, model or input): exit 2."""


def settle_run_spec(state_dir: str | Path, fresh: RunSpec) -> RunSpec:
    """``fresh`` with the run id saved in ``state_dir`` if there is one (then its classes,
    model and input must be the saved ones; training settings may change), else ``fresh``
    as built; saved either way."""
    path = Path(state_dir) / SPEC_FILE
    spec = fresh
    if path.exists():
        try:
            saved = decode_run_spec(path.read_bytes())
        except (RunSpecError, OSError) as err:
            raise RunSpecConflict(f"{path} cannot be read ({err}); delete it only if this "
                                  "state dir should start a new run") from None
        diffs = saved.differences(fresh, tuple(k for k in IDENTITY if k != "run_id"))
        if diffs:
            raise RunSpecConflict(
                f"{state_dir} holds run {saved.run_id}, which differs from this command line "
                f"in {'; '.join(diffs)}. Devices trained under it would be refused. Give the "
                "saved values again to resume that run, or another --state-dir to start a "
                "new one")
        spec = replace(fresh, run_id=saved.run_id)
        changed = saved.differences(spec, SETTINGS)
        if changed:
            log.warning("run %s: training settings changed since the last start: %s; devices "
                        "adopt them when they restart", spec.run_id, "; ".join(changed))
    tmp = path.with_name(SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(spec.to_dict(), indent=1))
    tmp.replace(path)
    return spec


def publish_run_spec(link, spec: RunSpec, wait: bool = True) -> None:
    """Retained, so a device that starts later (or reconnects) gets it at once."""
    link.publish(topics.RUN_TOPIC, spec.to_json(), retain=True, wait=wait)


def checkpoint_fields(spec: RunSpec) -> dict:
    """What a checkpoint's metadata takes from the run spec (export and predict read it)."""
    p = spec.preprocess
    return {"run_id": spec.run_id, "classes": list(spec.classes), "preprocess": dict(p),
            "image_size": p["size"], "normalization": {"mean": p["mean"], "std": p["std"]},
            "dataset": spec.dataset or "own"}
