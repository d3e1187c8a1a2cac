"""Batches straight from in-memory tensors, for datasets small enough to hold (digits,
CIFAR): the same batches a ``DataLoader`` would yield, without its per-sample indexing,
PIL transforms and collation. For CIFAR at batch 64 those cost ~21 ms a batch on this
machine, against a ~50 ms training step of the edge model (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

CROP_PADDING = 4  # RandomCrop(32, padding=4), the CIFAR augmentation of the ResNet papers


def random_crop_flip(x: torch.Tensor, generator: torch.Generator | None,
                     padding: int = CROP_PADDING) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch, then a random horizontal flip: what
    torchvision's RandomCrop(size, padding) + RandomHorizontalFlip() do one image at a time.
    ``x`` is (N, H, W, C) uint8, as CIFAR stores it; so is the result."""
    n, h, w, _ = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.arange(w).expand(n, 1, w)
    cols = torch.where(flip.view(n, 1, 1), w - 1 - cols, cols)  # a flip reverses the columns
    rows = top + torch.arange(h).view(1, h, 1)
    return padded[torch.arange(n).view(n, 1, 1), rows, left + cols]


class U8Images(Dataset):
    """uint8 (N, H, W, 3) images normalised per batch, optionally augmented per batch.

    Values equal torchvision's ToTensor() + Normalize(mean, std) bit for bit; with
    ``augment``, each image is one of the crops/flips RandomCrop + RandomHorizontalFlip
    would produce. The array is shared, not copied (CIFAR-10's train split is 150 MB).
    """

    def __init__(self, data: np.ndarray, labels: np.ndarray,
                 normalization: tuple[tuple[float, ...], tuple[float, ...]],
                 augment: bool) -> None:
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {data.dtype} "
                             f"{tuple(data.shape)}")
        self.data = torch.from_numpy(data)  # read only here
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.mean = torch.tensor(normalization[0]).view(1, 3, 1, 1)
        self.std = torch.tensor(normalization[1]).view(1, 3, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(torch.tensor([i]), None)
        return x[0], int(y[0])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data[idx]
        if self.augment:
            x = random_crop_flip(x, generator)
        x = x.permute(0, 3, 1, 2).contiguous().float().div(255)
        return x.sub_(self.mean).div_(self.std), self.labels[idx]


class BatchLoader:
    """Iterates a dataset that has ``batch(idx, generator)`` in batches.

    The order is exactly ``DataLoader(ds, batch_size, shuffle, generator=Generator(seed))``'s
    (the same draws from the same generator), so training on unaugmented data gives the
    same results either way; augmentation draws from a second generator.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.augment_generator = torch.Generator().manual_seed(seed + 1)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.dataset)
        # A DataLoader iterator first draws its workers' base seed, then the sampler's order.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield self.dataset.batch(order[start:start + self.batch_size],
                                     self.augment_generator)
        if self.shuffle:  # RandomSampler draws one more (empty) permutation at its end
            torch.randperm(n, generator=self.generator)
