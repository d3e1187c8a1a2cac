"""Distillation targets must stay paired with their own samples (the reference pairs them
by batch position under a reshuffling loader, so its KD targets belong to other images)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import edge_runtime.learning.train as train_mod
from edge_runtime.learning.data import WithIds, make_loader
from edge_runtime.learning.distill import LogitBank, kd_loss
from edge_runtime.learning.train import EdgeTrainConfig, make_optimizer, train_edge

N, C = 96, 10


class IdImages(Dataset):
    """Channel 2 of image i is the constant i/N; channels 0-1 get random augmentation."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        x = torch.zeros(3, 8, 8)
        x[:2] = torch.randn(2, 8, 8)  # a fresh random "augmentation" on every access
        if torch.rand(()) < 0.5:
            x = torch.flip(x, dims=[2])
        x[2] = i / N
        return x, i % C


def id_of(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x[:, 2, 0, 0] * N).long()


class SpyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, C)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.fc(x.mean(dim=(2, 3))), x


def test_kd_targets_follow_sample_ids_under_shuffling_and_augmentation(monkeypatch):
    teacher_table = torch.randn(N, C)
    ids = np.arange(N)[::2]  # this device holds the even samples
    bank = LogitBank(ids, C)
    bank.update(ids[:30], teacher_table[ids[:30]])  # and has hub logits for some of them
    calls = []

    def recording_kd(student, teacher, t):
        calls.append(teacher.detach().clone())
        return kd_loss(student, teacher, t)

    monkeypatch.setattr(train_mod, "kd_loss", recording_kd)
    model = SpyModel()
    loader = make_loader(WithIds(IdImages(), ids), batch_size=16, shuffle=True, seed=5)
    cfg = EdgeTrainConfig(epochs=3, batch_size=16)
    stats = train_edge(model, make_optimizer(model, 1e-2, 0), loader, bank, cfg)

    assert len(calls) == len(model.inputs) == 3 * 3  # every batch had some teacher rows
    checked = 0
    for x, teacher in zip(model.inputs, calls):
        true_ids = id_of(x)
        has = torch.isin(true_ids, torch.as_tensor(ids[:30]))
        assert torch.allclose(teacher, teacher_table[true_ids[has]])
        checked += int(has.sum())
    assert checked == stats.distilled == 3 * 30
    # The loader really reshuffled between epochs, so position-based pairing would break.
    orders = [id_of(x).tolist() for x in model.inputs]
    assert orders[0:3] != orders[3:6]


def test_bank_is_idempotent_and_rejects_foreign_ids():
    bank = LogitBank(np.array([5, 1, 9]), 3)
    z = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    bank.update(np.array([9, 1]), z)
    bank.update(np.array([9, 1]), z)  # a duplicated chunk changes nothing
    got, mask = bank.lookup(torch.tensor([1, 5, 9]))
    assert mask.tolist() == [True, False, True]
    assert torch.equal(got[0], z[1]) and torch.equal(got[2], z[0])
    with pytest.raises(ValueError, match="not in this bank"):
        bank.update(np.array([2]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="logits shape"):
        bank.update(np.array([1]), torch.zeros(1, 4))


def test_kd_loss_is_zero_for_equal_logits_and_scales_with_t_squared():
    z = torch.randn(4, 10)
    assert float(kd_loss(z, z, 3.0)) == pytest.approx(0.0, abs=1e-6)
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    manual = (torch.softmax(b, 1) * (torch.log_softmax(b, 1) - torch.log_softmax(a, 1))).sum(1)
    assert float(kd_loss(a, b, 1.0)) == pytest.approx(float(manual.mean()), rel=1e-5)


def test_ce_only_before_any_hub_logits(monkeypatch):
    monkeypatch.setattr(train_mod, "kd_loss", lambda *a: pytest.fail("KD without a teacher"))
    ids = np.arange(N)
    model = SpyModel()
    loader = make_loader(WithIds(IdImages(), ids), 32, shuffle=True)
    stats = train_edge(model, make_optimizer(model, 1e-2, 0), loader, LogitBank(ids, C),
                       EdgeTrainConfig(batch_size=32))
    assert stats.distilled == 0 and stats.samples == N
