"""FLOP counting through our wrappers: closed-form counts for tiny modules, and the known
counts of the toolkit's real models (the numbers the paper's claims rest on)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from device_profiles.flops import forward_flops, forward_flops_torch, training_step_flops
from device_profiles.model_zoo import MODELS, get_model, profile_model


def test_single_conv_closed_form():
    # each of the 8 x 16 x 16 outputs is a 3 x 3 x 3 dot product: 27 multiply-adds
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    counted = forward_flops(conv, torch.zeros(1, 3, 16, 16))
    assert counted.total == 8 * 16 * 16 * 27 == 55_296
    assert counted.by_operator == {"conv": 55_296}


def test_strided_grouped_conv_closed_form():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4, bias=False)
    counted = forward_flops(conv, torch.zeros(2, 8, 10, 10))
    # batch 2 x 16 channels x 5 x 5 outputs, each (8/4) x 3 x 3 = 18 multiply-adds
    assert counted.total == 2 * 16 * 5 * 5 * 18


def test_linear_closed_form_and_batch_scaling():
    lin = nn.Linear(64, 10)
    assert forward_flops(lin, torch.zeros(1, 64)).total == 640
    assert forward_flops(lin, torch.zeros(5, 64)).total == 5 * 640


def test_by_module_names_the_submodules():
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    counted = forward_flops(net, torch.zeros(1, 1, 4, 4))
    assert counted.by_module["0"] == 2 * 16 * 1
    assert counted.by_module["2"] == 32 * 3
    assert counted.by_module[""] == counted.total == 32 + 96


def test_training_flops_are_two_per_mac_forward_and_backward():
    # y = x W^T costs B*in*out MACs; its backward costs as much for grad_weight and again
    # for grad_input, which the first layer skips (the data needs no gradient).
    # FlopCounterMode counts 2 flops per MAC.
    net = nn.Sequential(nn.Linear(32, 16, bias=False), nn.Linear(16, 10, bias=False))
    b = 4
    first, second = b * 32 * 16, b * 16 * 10
    assert forward_flops_torch(net, torch.zeros(b, 32)) == 2 * (first + second)
    assert training_step_flops(net, torch.randn(b, 32), 10) == 2 * (2 * first + 3 * second)


def test_first_conv_needs_no_input_gradient():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 2, bias=False))
    x = torch.randn(2, 3, 8, 8)
    conv_macs = 2 * 4 * 8 * 8 * 27
    lin_macs = 2 * 256 * 2
    # conv: forward + weight gradient only; linear: forward + both gradients
    assert training_step_flops(conv, x, 2) == 2 * (2 * conv_macs + 3 * lin_macs)


def test_wrappers_leave_the_mode_alone():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    net.eval()
    training_step_flops(net, torch.randn(3, 4), 4)
    assert not net.training
    net.train()
    forward_flops(net, torch.zeros(3, 4))
    assert net.training


# The figures in the README (The models), per 32x32 image, 10 classes.
KNOWN = {
    "resnet8": (10_586, 9_618_048),
    "resnet55": (590_858, 86_772_224),
    "resnet109": (1_147_274, 166_988_288),
    "resnet56": (591_322, 87_214_592),
    "resnet110": (1_147_738, 167_430_656),
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_known_model_counts_on_meta_tensors(name):
    entry = get_model(name)
    with torch.device("meta"):
        model = entry.build(10)
    params, macs = KNOWN[name]
    assert sum(p.numel() for p in model.parameters()) == params
    x = torch.empty(2, entry.input_channels, 32, 32, device="meta")
    assert forward_flops_torch(model, x) == 2 * 2 * macs  # batch 2, 2 flops per MAC


def test_edge_model_profile_matches_the_paper():
    p = profile_model("resnet8")
    assert p.params == 10_586
    assert p.conv_linear_macs == 9_618_048  # "9.618 M multiply-adds"
    assert p.forward_macs_by_operator["conv"] == 9_617_408
    assert p.forward_macs_by_operator["linear"] == 640
    assert p.forward_macs_by_module["extractor"] == 3 * 9 * 16 * 32 * 32 + 16 * 32 * 32 * 2
    # training step: every conv's backward twice its forward, except the stem's input grad
    stem = 3 * 9 * 16 * 32 * 32
    assert p.train_flops_per_sample == 2 * (3 * 9_618_048 - stem)
    assert p.forward_flops_per_sample == 2 * 9_618_048


def test_server_model_profile_fvcore():
    p = profile_model("resnet55")
    assert p.params == 590_858
    assert p.conv_linear_macs == 86_772_224  # "86.77 M"
    assert p.input_shape == (16, 32, 32)


def test_paper_ratios():
    edge = KNOWN["resnet8"][1]
    assert KNOWN["resnet56"][1] / edge == pytest.approx(9.07, abs=0.01)  # "9.1x"
    assert KNOWN["resnet110"][1] / edge == pytest.approx(17.41, abs=0.01)  # "17.4x"


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="resnet8"):
        get_model("resnet9000")
    assert set(MODELS) == set(KNOWN)
