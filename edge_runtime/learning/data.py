"""Datasets with stable sample ids.

Every training sample is identified by its index in the full training split; that id
travels with its features to the hub and keys the logits that come back, so a
distillation target can never be paired with another image (the reference code pairs
them by batch position under a reshuffling loader).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from edge_runtime.learning.batches import BatchLoader, U8Images

NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cinic10": ((0.4789, 0.4723, 0.4305), (0.2421, 0.2383, 0.2587)),
    "digits": ((0.3, 0.3, 0.3), (0.4, 0.4, 0.4)),  # close to the data's own statistics
}
DATASETS = ("digits", "cifar10", "cifar100", "cinic10")
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "cinic10": 10}


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where, at what size, with or without augmentation."""

    dataset: str = "digits"
    root: str = "data"  # local root for torchvision datasets; digits ship with the package
    image_size: int = 0  # 0 = the dataset's native size (32; digits: 8)
    augment: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose from {list(DATASETS)}")
        if self.image_size < 0:
            raise ValueError(f"image_size must be >= 0, got {self.image_size}")

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) applied to inputs in [0, 1]; exported models need it."""
        return NORMALIZATION[self.dataset]

    @property
    def size(self) -> int:
        if self.image_size:
            return self.image_size
        return 8 if self.dataset == "digits" else 32  # digits: native 8x8, no upsampling


@dataclass(frozen=True)
class Split:
    """One split of a dataset: a map-style dataset yielding (x, y) plus its label array."""

    dataset: Dataset
    targets: np.ndarray
    normalization: tuple[tuple[float, ...], tuple[float, ...]]


class TensorImages(Dataset):
    """In-memory images (N,3,S,S) float32 with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx].long()


class WithIds(Dataset):
    """A subset of a split yielding (x, y, sample_id). Sample ``ids[i]`` is row
    ``positions[i]`` of ``base``; without ``positions`` the ids are the rows (academic
    datasets: an id is the index into the full split; own data: ids come from content)."""

    def __init__(self, base: Dataset, ids: np.ndarray, positions: np.ndarray | None = None
                 ) -> None:
        self.base = base
        self.ids = np.asarray(ids, dtype=np.int64)
        self.positions = self.ids if positions is None else np.asarray(positions, np.int64)
        if self.positions.shape != self.ids.shape:
            raise ValueError(f"{len(self.positions)} positions for {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x, y = self.base[int(self.positions[i])]
        return x, y, int(self.ids[i])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.positions)[idx]
        return (*self.base.batch(rows, generator), torch.from_numpy(self.ids)[idx])


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed so sample ids are stable whatever the experiment seed


# scikit-learn's 1,797 8x8 digits (values 0..16), shipped as package data so that a device
# needs no scikit-learn (~210 MB of RSS on a Pi); tests check the file against sklearn.
DIGITS_FILE = Path(__file__).with_name("digits.npz")


def write_digits_file(path: Path = DIGITS_FILE) -> None:
    """(Re)generate the shipped digits file from scikit-learn, its source."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    np.savez_compressed(path, images=bunch.images.astype(np.uint8),
                        target=bunch.target.astype(np.uint8))


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as (images uint8 [1797, 8, 8], labels int64 [1797])."""
    with np.load(DIGITS_FILE) as f:
        return f["images"], f["target"].astype(np.int64)


def _digits(train: bool, size: int) -> Split:
    raw, labels = digits_arrays()
    # values 0..16, held as the 8-bit greys an image file of them carries (write them as
    # PNGs and gkt-edge predict sees exactly the pixels the hub evaluated on)
    images = torch.round(torch.tensor(raw, dtype=torch.float32) * (255 / 16)) / 255
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = int(round(len(labels) * DIGITS_TEST_FRACTION))
    keep = order[n_test:] if train else order[:n_test]
    keep = np.sort(keep)
    x = images[keep].unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    (mean, *_), (std, *_) = NORMALIZATION["digits"]
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()
    images = TensorImages(x, torch.from_numpy(labels[keep]))
    return Split(images, labels[keep], NORMALIZATION["digits"])


def _cifar(dataset: str, root: str, train: bool, transform=None) -> Dataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        return cls(root, train=train, transform=transform, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{dataset} not found under {root}: {err}. Download it once with "
            f"torchvision.datasets.{cls.__name__}({root!r}, download=True)"
        ) from err


@functools.lru_cache(maxsize=4)
def _cifar_arrays(dataset: str, root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR's uint8 images and labels, read once per process: a device's augmented and
    plain views of its training split share them (150 MB for CIFAR-10's)."""
    ds = _cifar(dataset, root, train)
    return ds.data, np.asarray(ds.targets, dtype=np.int64)


def _torchvision(cfg: DataConfig, train: bool) -> Split:
    from torchvision import datasets, transforms

    mean, std = NORMALIZATION[cfg.dataset]
    root = Path(cfg.root).expanduser()
    if cfg.dataset != "cinic10" and cfg.size == 32:  # in memory: batched, no PIL
        data, targets = _cifar_arrays(cfg.dataset, str(root), train)
        return Split(U8Images(data, targets, (mean, std), augment=train and cfg.augment),
                     targets, (mean, std))
    steps: list = []
    if train and cfg.augment:
        steps += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    if cfg.size != 32:
        steps.append(transforms.Resize(cfg.size))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    tf = transforms.Compose(steps)
    if cfg.dataset == "cinic10":
        folder = root / ("train" if train else "test")
        if not folder.is_dir():
            raise FileNotFoundError(f"CINIC-10 not found: expected image folders under {folder}")
        ds = datasets.ImageFolder(str(folder), transform=tf)
    else:
        ds = _cifar(cfg.dataset, str(root), train, tf)
    return Split(ds, np.asarray(ds.targets, dtype=np.int64), (mean, std))


def load_split(cfg: DataConfig, train: bool) -> Split:
    if cfg.dataset == "digits":
        return _digits(train, cfg.size)
    return _torchvision(cfg, train)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool,
                seed: int = 0) -> DataLoader | BatchLoader:
    """Batches of ``ds``; straight from memory when it can (``BatchLoader``, same order)."""
    if hasattr(ds, "batch") and (not isinstance(ds, WithIds) or hasattr(ds.base, "batch")):
        return BatchLoader(ds, batch_size, shuffle, seed)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)
