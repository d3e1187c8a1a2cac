"""Memory measurements: saved-tensor hooks and torch.profiler against closed-form sizes,
and the training-memory prediction against a real training run in a fresh process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from device_profiles.memory import (
    allocator_peak,
    measure_training_peak,
    runtime_footprint,
    saved_activations,
)
from device_profiles.model_zoo import profile_model


def test_saved_activations_closed_form():
    # Linear(8->16) saves its input (the data: excluded) and weight (a parameter: excluded);
    # ReLU saves its 16-float output, which Linear(16->4) saves again (same storage);
    # cross-entropy saves its 4 log-probabilities and the int64 target: 64 + 16 + 8 bytes.
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    acts = saved_activations(net, (8,), num_classes=4)
    assert acts.saved_per_sample == 4 * 16 + 4 * 4 + 8
    assert acts.largest_output_per_sample == 4 * 16
    assert acts.saved_at(10) == acts.saved_fixed + 10 * 88


def test_saved_activations_same_on_meta_and_real():
    real = saved_activations(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                           nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)),
                             (3, 6, 6), 5)
    with torch.device("meta"):
        meta_net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(8 * 36, 5))
    assert saved_activations(meta_net, (3, 6, 6), 5) == real


def test_allocator_peak_sees_torch_memory():
    def work():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # + 2 MB while a is alive
        del a, b
        torch.empty(100)

    assert allocator_peak(work) == 6_000_000


def test_predicted_training_memory_matches_torch_in_process():
    import torch.nn.functional as F

    from device_profiles.model_zoo import get_model
    from edge_runtime.learning.train import make_optimizer

    batch = 8

    def train():
        model = get_model("resnet8").build(10)
        opt = make_optimizer(model, 1e-3, 1e-4)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        for _ in range(2):  # the second step has Adam's buffers too
            loss = F.cross_entropy(model(x)[0], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    predicted = profile_model("resnet8").cost().training_bytes(batch)
    assert allocator_peak(train) == pytest.approx(predicted, rel=0.05)


@pytest.mark.slow
def test_predicted_training_memory_matches_a_fresh_process():
    batch = 16
    measured = measure_training_peak("resnet8", batch)
    predicted = profile_model("resnet8").cost().training_bytes(batch)
    assert measured.allocator_peak_bytes == pytest.approx(predicted, rel=0.05)
    assert measured.process_peak_rss_bytes > measured.import_rss_bytes > 0


@pytest.mark.slow
def test_runtime_footprint_of_torch():
    rt = runtime_footprint()
    assert rt.python_bytes < rt.torch_bytes <= rt.device_stack_bytes
    assert rt.torch_bytes > 100 * 2**20  # torch costs at least ~100 MiB on any wheel
