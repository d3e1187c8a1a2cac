"""The hub's held-out images: a folder with one subfolder per class, read with the one
preprocessing (edge_runtime/learning/preprocess.py) into memory, labelled by the run's
class names. Also the per-channel statistics that become the run's normalization."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.learning.batches import U8Images
from edge_runtime.learning.preprocess import Preprocess, UnreadableImage, load_image, to_rgb_u8

log = logging.getLogger("gkt.hub")


class HeldOutError(ValueError):
    """A test folder the hub cannot use (missing, empty, classes the run does not know)."""


@dataclass(frozen=True)
class HeldOutImages:
    images: np.ndarray  # uint8 (N, S, S, 3), preprocessing steps 1-3
    labels: np.ndarray  # int64 indices into the run's classes
    skipped: tuple[str, ...]  # files that are not readable images

    def dataset(self, pre: Preprocess) -> U8Images:
        """Normalised per batch, as the devices' own images are."""
        return U8Images(self.images, self.labels, (pre.mean, pre.std), augment=False)


def class_folders(root: str | Path) -> list[str]:
    """Sorted names of ``root``'s visible subfolders: ``--classes-from DIR``."""
    root = Path(root)
    if not root.is_dir():
        raise HeldOutError(f"{root} is not a folder")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise HeldOutError(f"{root} has no class subfolders (expected {root}/CLASS/IMAGE)")
    return names


def read_test_folder(root: str | Path, classes: tuple[str, ...], pre: Preprocess) -> HeldOutImages:
    """Every readable image under ``root/CLASS/`` (unreadable files are skipped and named
    once); HeldOutError for a folder whose class is not in ``classes``, or no image."""
    root = Path(root)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in class_folders(root) if c not in index]
    if unknown:
        raise HeldOutError(f"{root} has class folders the run does not know: {unknown[:8]} "
                            f"(the run's classes: {list(classes)[:20]})")
    images, labels, skipped = [], [], []
    for c in class_folders(root):
        for f in sorted(p for p in (root / c).rglob("*") if p.is_file()):
            try:
                images.append(to_rgb_u8(load_image(f, pre.size), pre))
            except UnreadableImage as err:
                skipped.append(str(err))
                continue
            labels.append(index[c])
    if skipped:
        log.warning("test data: skipped %d unreadable files: %s", len(skipped),
                    "; ".join(skipped[:20]))
    if not images:
        raise HeldOutError(f"{root} holds no readable image")
    return HeldOutImages(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(skipped))


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of uint8 (N, S, S, 3) images scaled to [0, 1]."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    std = np.maximum(x.std(axis=0), 1e-3)  # a one-colour channel must not divide by zero
    return tuple(round(float(v), 4) for v in x.mean(axis=0)), tuple(round(float(v), 4)
                                                                   for v in std)
