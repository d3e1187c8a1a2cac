"""Seeded, reproducible partitions of a training split over devices."""

from __future__ import annotations

import numpy as np


def parse_partition(spec: str) -> tuple[str, float]:
    """'iid' -> ('iid', 0); 'dirichlet:0.5' -> ('dirichlet', 0.5)."""
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return "iid", 0.0
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return "dirichlet", alpha
    raise ValueError(f"bad partition {spec!r}: use 'iid' or 'dirichlet:ALPHA' with ALPHA > 0")


def iid(n: int, devices: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, devices)]


def dirichlet(
    targets: np.ndarray, devices: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) shares over devices; redrawn until every device has min_size."""
    rng = np.random.default_rng(seed)
    classes = np.unique(targets)
    min_size = min(min_size, len(targets) // devices)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(targets == c))
            shares = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not give each of {devices} devices {min_size} samples (alpha={alpha})")


def partition(targets: np.ndarray, devices: int, spec: str, seed: int) -> list[np.ndarray]:
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    kind, alpha = parse_partition(spec)
    if kind == "iid":
        return iid(len(targets), devices, seed)
    return dirichlet(targets, devices, alpha, seed)
