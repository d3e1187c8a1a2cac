"""Class-subfolder image trees for lab trials and demos: the shipped digits written as
PNG files, and one folder split into per-device folders of links.

A split device folder looks exactly like a real device's own data (``own_data``), so a
simulation runs the deployment path. Files are linked, not copied: symbolic links where
the file system allows them, else hard links, else copies.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from edge_runtime.learning.data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, digits_arrays
from edge_runtime.learning.own_data import list_folder
from edge_runtime.learning.partition import partition

DIGIT_CLASSES = tuple(str(d) for d in range(10))


def digits_split_indices(train: bool) -> np.ndarray:
    """Indices of the digits train or test split (the same split ``load_split`` uses)."""
    n = len(digits_arrays()[1])
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(round(n * DIGITS_TEST_FRACTION))
    return np.sort(order[n_test:] if train else order[:n_test])


def write_digits(dest: str | Path, train: bool = True) -> Path:
    """The digits split as 8x8 greyscale PNGs in ``dest/<digit>/<index>.png``."""
    images, labels = digits_arrays()
    dest = Path(dest)
    for c in DIGIT_CLASSES:
        (dest / c).mkdir(parents=True, exist_ok=True)
    for i in digits_split_indices(train):
        pixels = np.round(images[i].astype(np.float64) * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").save(dest / str(labels[i]) / f"{i:04d}.png")
    return dest


def _link(src: Path, dst: Path) -> str:
    """Link ``dst`` to ``src``; returns how ("symlink", "hardlink" or "copy")."""
    try:
        dst.symlink_to(src)
        return "symlink"
    except OSError:
        pass
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def split_folder(src: str | Path, dest: str | Path, devices: int, spec: str = "iid",
                 seed: int = 0) -> list[Path]:
    """Split ``src`` (one subfolder per class) into ``dest/device-<k>/<class>/...`` for
    ``devices`` devices by ``spec`` ("iid" or "dirichlet:ALPHA", per class, seeded). Every
    device folder gets every class folder (empty ones too). ``dest/split.json`` records
    the split. Files are not decoded here: a bad file goes to some device, which skips it.
    """
    src, dest = Path(src).resolve(), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder (expected one subfolder per class)")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty: give a new folder for the split")
    listing = list_folder(src)
    if not listing.entries:
        raise ValueError(f"{src}: no files in class subfolders")
    classes = sorted({p.name for p in src.iterdir() if p.is_dir() and not p.name[0] == "."})
    index = {c: i for i, c in enumerate(classes)}
    targets = np.array([index[e.label] for e in listing.entries], np.int64)
    parts = partition(targets, devices, spec, seed)
    folders = [dest / f"device-{k}" for k in range(devices)]
    ways: dict[str, int] = {}
    report = []
    for folder, part in zip(folders, parts):
        for c in classes:
            (folder / c).mkdir(parents=True, exist_ok=True)
        for i in part:
            e = listing.entries[i]
            rel = Path(e.path).relative_to(src)
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            how = _link(Path(e.path), folder / rel)
            ways[how] = ways.get(how, 0) + 1
        counts = np.bincount(targets[part], minlength=len(classes))
        report.append({"folder": folder.name, "files": int(len(part)),
                       "per_class": dict(zip(classes, counts.tolist()))})
    (dest / "split.json").write_text(json.dumps(
        {"source": str(src), "partition": spec, "seed": seed, "links": ways,
         "devices": report}, indent=1))
    return folders
