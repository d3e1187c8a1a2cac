"""Real samples for verification (the test split) and calibration (the training split)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from edge_runtime.learning.data import DataConfig, load_split


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
