"""In-memory batching (edge_runtime/batches.py), the shipped digits and bf16 training."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from edge_runtime.learning.batches import CROP_PADDING, BatchLoader, U8Images, random_crop_flip
from edge_runtime.learning.data import DataConfig, WithIds, digits_arrays, load_split, make_loader
from edge_runtime.learning.models import EdgeResNet8
from edge_runtime.learning.train import EdgeTrainConfig, make_optimizer, train_edge

MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def test_batch_loader_yields_the_data_loaders_batches_in_its_order():
    split = load_split(DataConfig("digits", image_size=8), train=True)
    ds = WithIds(split.dataset, np.arange(3, 300, 2))
    fast = make_loader(ds, 32, shuffle=True, seed=5)
    assert isinstance(fast, BatchLoader)
    plain = DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert len(fast) == len(plain) == 5
    for _ in range(2):  # a second epoch draws a new order, the same one in both
        batches = list(zip(fast, plain))
        assert len(batches) == 5
        for (x, y, ids), (x0, y0, ids0) in batches:
            assert torch.equal(ids, ids0) and torch.equal(y, y0) and torch.equal(x, x0)
            assert y.dtype == ids.dtype == torch.int64


def test_u8_images_match_torchvision_to_tensor_and_normalize_exactly():
    data = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ds = U8Images(data, np.arange(6), MEAN_STD, augment=False)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*MEAN_STD)])
    x, y = ds.batch(torch.tensor([4, 1]), None)
    assert torch.equal(x[0], tf(Image.fromarray(data[4]))) and y.tolist() == [4, 1]
    assert torch.equal(ds[1][0], tf(Image.fromarray(data[1])))


def test_random_crop_flip_gives_one_of_torchvisions_crops_and_flips_per_image():
    n, size = 24, 8
    data = torch.from_numpy(np.random.default_rng(1).integers(1, 256, (n, size, size, 3),
                                                               dtype=np.uint8))
    out = random_crop_flip(data, torch.Generator().manual_seed(0))
    assert out.shape == data.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(data, (0, 0, 4, 4, 4, 4))
    seen = set()
    for i in range(n):
        matches = [(top, left, flip) for top in range(2 * CROP_PADDING + 1)
                   for left in range(2 * CROP_PADDING + 1) for flip in (False, True)
                   if torch.equal(out[i], _crop(padded[i], top, left, size, flip))]
        assert len(matches) == 1, f"image {i} is not a unique crop/flip: {matches}"
        seen.add(matches[0])
    assert len(seen) > n // 2  # the crops differ between images
    assert {m[2] for m in seen} == {False, True}


def _crop(img, top, left, size, flip):
    c = img[top:top + size, left:left + size]
    return c.flip(1) if flip else c


def test_cifar_splits_are_batched_in_memory_and_share_their_images(tmp_path, monkeypatch):
    from test_data import write_fake_cifar

    write_fake_cifar(tmp_path, n_train=50)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    aug = load_split(DataConfig("cifar10", str(tmp_path)), train=True)
    plain = load_split(DataConfig("cifar10", str(tmp_path), augment=False), train=True)
    assert isinstance(aug.dataset, U8Images) and aug.dataset.augment
    assert not plain.dataset.augment
    assert aug.dataset.data.data_ptr() == plain.dataset.data.data_ptr()  # one copy in memory
    ids = np.arange(0, 50, 3)
    x, y, got = next(iter(make_loader(WithIds(aug.dataset, ids), 8, shuffle=True)))
    assert x.shape == (8, 3, 32, 32) and set(got.tolist()) <= set(ids.tolist())
    assert torch.equal(y, torch.from_numpy(aug.targets)[got])


def test_shipped_digits_are_scikit_learns():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = digits_arrays()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)


def test_bf16_training_step_stays_close_to_fp32():
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        model = EdgeResNet8(10)
        opt = make_optimizer(model, 1e-3, 1e-4)
        cfg = EdgeTrainConfig(precision=precision)
        opt.step = lambda: None  # keep the weights: compare this step's loss and gradients
        stats = train_edge(model, opt, [(x, y, torch.arange(32))], None, cfg)
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[precision] = (stats.loss, grads)
    (loss32, g32), (loss16, g16) = results["fp32"], results["bf16"]
    assert abs(loss16 - loss32) < 0.02 * loss32
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > 0.99 and (g16 - g32).norm() < 0.1 * g32.norm()


def test_unknown_precision_is_refused_at_configuration():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        EdgeTrainConfig(precision="fp8")
