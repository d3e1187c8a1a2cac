"""Datasets: real torchvision loaders on small files written in the real formats."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.learning.data import DataConfig, WithIds, load_split


def write_fake_cifar(root: Path, n_train: int = 50, n_test: int = 20, classes: int = 10) -> None:
    """cifar-10-batches-py with 5 train batches, a test batch and batches.meta (pickle)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name: str, n: int, offset: int) -> None:
        labels = [(i + offset) % classes for i in range(n)]
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        data[:, 0] = np.arange(n) + offset  # first red pixel encodes the sample's index
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)

    per = n_train // 5
    for i in range(5):
        batch(f"data_batch_{i + 1}", per, i * per)
    batch("test_batch", n_test, 0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(classes)]}, f)


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path)
    # The files are ours, so the md5 sums of the real archive cannot match.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    return tmp_path


def test_cifar10_loads_through_torchvision(fake_cifar):
    train = load_split(DataConfig("cifar10", str(fake_cifar), augment=False), train=True)
    test = load_split(DataConfig("cifar10", str(fake_cifar)), train=False)
    assert len(train.dataset) == 50 and len(test.dataset) == 20
    x, y = train.dataset[7]
    assert x.shape == (3, 32, 32) and y == 7 % 10
    assert train.targets.tolist()[:3] == [0, 1, 2]
    # Normalized first red pixel gives back the index written into the file.
    mean, std = train.normalization
    assert round(float(x[0, 0, 0] * std[0] + mean[0]) * 255) == 7


def test_sample_ids_are_indices_into_the_full_split(fake_cifar):
    train = load_split(DataConfig("cifar10", str(fake_cifar), augment=True), train=True)
    ds = WithIds(train.dataset, np.array([3, 11, 42]))
    assert [ds[i][2] for i in range(3)] == [3, 11, 42]
    assert [ds[i][1] for i in range(3)] == [3, 1, 2]


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10 not found under"):
        load_split(DataConfig("cifar10", str(tmp_path)), train=True)


def test_cinic10_image_folder(tmp_path):
    for split in ("train", "test"):
        for cls in ("airplane", "cat"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((32, 32, 3), i * 40, np.uint8)).save(d / f"{i}.png")
    train = load_split(DataConfig("cinic10", str(tmp_path)), train=True)
    assert len(train.dataset) == 6 and sorted(set(train.targets.tolist())) == [0, 1]
    assert train.dataset[0][0].shape == (3, 32, 32)


def test_digits_split_is_stable_and_disjoint():
    train = load_split(DataConfig("digits"), train=True)
    test = load_split(DataConfig("digits"), train=False)
    assert len(train.dataset) + len(test.dataset) == 1797
    again = load_split(DataConfig("digits"), train=True)
    assert torch.equal(train.dataset.images, again.dataset.images)
    x, _ = train.dataset[0]
    assert x.shape == (3, 8, 8)
    big = load_split(DataConfig("digits", image_size=32), train=True)
    assert big.dataset[0][0].shape == (3, 32, 32)
    assert sorted(set(test.targets.tolist())) == list(range(10))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        DataConfig("mnist")
