"""Per-device image folders for in-process runs: GKT, FedAvg and centralized then train on
exactly the images the `gkt-edge --data` processes of an MQTT simulation would (the same
scan: duplicates once, bad files skipped, labels by the run's class names)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edge_runtime.device.own_data_source import splits
from edge_runtime.learning.catalog import ImageCatalog
from edge_runtime.learning.data import Split
from edge_runtime.learning.own_data import DataSpec, LocalImages, OwnData, OwnDataConfig
from edge_runtime.learning.preprocess import preprocess_of
from edge_runtime.protocol.run_spec import RunSpec
from server_hub.run.test_data import HeldOutImages
from server_hub.simulation.inproc import Setup


def folder_classes(folders: list[str]) -> tuple[str, ...]:
    """The sorted union of the folders' class subfolders (what `--device-data` alone implies)."""
    names = {p.name for f in folders for p in Path(f).iterdir()
             if p.is_dir() and not p.name.startswith(".")}
    if not names:
        raise ValueError(f"no class subfolders in {folders}")
    return tuple(sorted(names))


def own_setup(folders: list[str], spec: RunSpec, test: HeldOutImages | None,
              cache_dir: str | Path | None = None) -> Setup:
    """A Setup whose shard k is folder k's images (none held out: the hub's --test-data
    is the test set)."""
    if test is None:
        raise ValueError("in-process runs on own folders need --test-data DIR (held-out "
                         "images, one subfolder per class) to measure accuracy")
    pre = preprocess_of(spec)
    data_spec = DataSpec(spec.classes, pre)
    cache = Path(cache_dir or tempfile.mkdtemp(prefix="gkt-own-"))
    cache.mkdir(parents=True, exist_ok=True)
    parts: list[LocalImages] = []
    for k, folder in enumerate(folders):
        own = OwnData(OwnDataConfig(str(folder), data_spec, val_fraction=0.0),
                      ImageCatalog(cache / f"device-{k}.sqlite"))
        parts.append(own.scan().train)
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    norm = (pre.mean, pre.std)
    every = LocalImages(images, labels, np.arange(len(labels), dtype=np.int64))
    train, train_eval = splits(every, norm, augment=True)
    bounds = np.cumsum([0] + [len(p.labels) for p in parts])
    shards = [np.arange(a, b, dtype=np.int64) for a, b in zip(bounds[:-1], bounds[1:])]
    test_split = Split(test.dataset(pre), test.labels, norm)
    return Setup(train, train_eval, test_split, shards, num_classes=spec.num_classes,
                 classes=list(spec.classes))
