"""Real samples for verification and calibration: an academic dataset's test and training
splits, or for a run on devices' own data, the hub's held-out image folder (``--test-data``)
read with the run's own preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from edge_runtime.learning.data import DataConfig, load_split
from edge_runtime.learning.preprocess import normalize
from export.metadata import preprocess_of
from server_hub.run.test_data import read_test_folder


@dataclass(frozen=True)
class Samples:
    test_x: torch.Tensor  # float32 NCHW, normalised as in training
    test_y: np.ndarray  # int64 class indices
    calib_x: torch.Tensor | None  # int8 calibration inputs (None: no quantization asked)


def data_config(meta: dict, root: str) -> DataConfig:
    """The checkpoint's dataset at its input size, without augmentation."""
    cfg = DataConfig(meta["dataset"], root, int(meta["image_size"]), augment=False)
    mean, std = cfg.normalization
    norm = meta["normalization"]
    if not (np.allclose(mean, norm["mean"]) and np.allclose(std, norm["std"])):
        raise ValueError(f"checkpoint normalization {norm} differs from the data loader's "
                         f"(mean {mean}, std {std}); verification would feed wrong inputs")
    return cfg


def load_images(cfg: DataConfig, train: bool, limit: int = 0,
                seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(x, y) as one tensor and label array. ``limit`` > 0 keeps that many: the first ones
    of the test split, a seeded random subset of the training split."""
    split = load_split(cfg, train=train)
    ds = split.dataset
    n = len(split.targets)
    if 0 < limit < n:
        idx = (np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)) if train
               else np.arange(limit))
        ds = Subset(ds, idx.tolist())
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=256, shuffle=False, num_workers=0):
        xs.append(x)
        ys.append(np.asarray(y))
    return torch.cat(xs).float().contiguous(), np.concatenate(ys).astype(np.int64)


def folder_samples(meta: dict, folder: str, limit: int, calibration: int) -> Samples:
    """An own-data run's held-out folder, labelled by the checkpoint's class names. It is
    the only data a hub holds, so int8 calibrates on a seeded subset of it too."""
    if not meta.get("classes"):
        raise ValueError("the checkpoint names no classes; it is not from an own-data run")
    pre = preprocess_of(meta)
    held = read_test_folder(folder, tuple(meta["classes"]), pre)
    x, y = torch.from_numpy(normalize(held.images, pre)), held.labels
    calib = None
    if calibration:
        n = len(y)
        pick = np.sort(np.random.default_rng(0).choice(n, min(calibration, n), replace=False))
        calib = x[pick]
    if 0 < limit < len(y):
        x, y = x[:limit], y[:limit]
    return Samples(x.contiguous(), y, calib)


def samples_for(meta: dict, data_root: str, test_data: str | None, limit: int,
                calibration: int) -> Samples:
    """Verification (and calibration) samples for a checkpoint: its run's held-out folder
    when given, else its academic dataset. ``calibration`` 0: no calibration samples."""
    if test_data:
        return folder_samples(meta, test_data, limit, calibration)
    if meta["dataset"] == "own":
        raise ValueError("this checkpoint is from a run on devices' own data: give the hub's "
                         "held-out folder (--test-data DIR, one subfolder per class) to verify "
                         "the graphs on")
    dcfg = data_config(meta, data_root)
    test_x, test_y = load_images(dcfg, train=False, limit=limit)
    calib = load_images(dcfg, train=True, limit=calibration)[0] if calibration else None
    return Samples(test_x, test_y, calib)
