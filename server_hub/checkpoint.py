"""Hub checkpoints: safetensors weights plus a JSON description, one folder per round.

Layout under ``<state_dir>/checkpoints/``::

    round-0007/server.safetensors      server model
    round-0007/extractors.safetensors  "<device>/<param>" -> each device's extractor
    round-0007/optimizer.pt            hub optimizer (written and read only by the hub)
    round-0007/rng.safetensors         shuffle generator and torch RNG states (a resumed
                                       run repeats the uninterrupted one)
    round-0007/meta.json               round, dataset, classes, input size, normalization, ...
    LATEST                             name of the newest complete round folder
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Checkpoint:
    """A saved round: server weights, every device's extractor, and what made them."""

    path: Path
    meta: dict
    server: dict[str, torch.Tensor]
    extractors: dict[str, dict[str, torch.Tensor]]
    rng: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def round(self) -> int:
        return int(self.meta["round"])


def save_checkpoint(
    state_dir: Path,
    meta: dict,
    server: dict[str, torch.Tensor],
    extractors: dict[str, dict[str, torch.Tensor]],
    optimizer: dict | None = None,
    keep: int = 3,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write atomically (temp folder, then rename, then LATEST) and keep the newest ``keep``."""
    root = Path(state_dir) / "checkpoints"
    name = f"round-{int(meta['round']):04d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in server.items()},
              str(tmp / "server.safetensors"))
    flat = {f"{d}/{k}": v.detach().cpu().contiguous()
            for d, state in extractors.items() for k, v in state.items()}
    save_file(flat, str(tmp / "extractors.safetensors"))
    if optimizer is not None:
        torch.save(optimizer, tmp / "optimizer.pt")
    if rng:
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / "LATEST.tmp").write_text(name)
    (root / "LATEST.tmp").replace(root / "LATEST")
    for old in sorted(root.glob("round-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(state_dir: Path) -> Path | None:
    marker = Path(state_dir) / "checkpoints" / "LATEST"
    if not marker.exists():
        return None
    return marker.parent / marker.read_text().strip()


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a round folder, or the newest one if given a state dir."""
    path = Path(path)
    if not (path / "meta.json").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint at {path} (expected meta.json or "
                                    f"checkpoints/LATEST)")
        path = found
    meta = json.loads((path / "meta.json").read_text())
    extractors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path / "extractors.safetensors")).items():
        device, _, name = key.partition("/")
        extractors.setdefault(device, {})[name] = value
    rng = load_file(str(path / "rng.safetensors")) if (path / "rng.safetensors").exists() else {}
    return Checkpoint(path, meta, load_file(str(path / "server.safetensors")), extractors, rng)


def load_optimizer_state(path: Path) -> dict | None:
    opt = Path(path) / "optimizer.pt"
    return torch.load(opt, weights_only=True) if opt.exists() else None
