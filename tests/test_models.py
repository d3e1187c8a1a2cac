import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from edge_runtime.learning.models import EdgeResNet8, FeatureExtractor, count_parameters
from server_hub.models import (
    build_server,
    resnet55_server,
    resnet56,
    resnet109_server,
    resnet110,
)


def conv_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the convolutions only (FlopCounterMode counts 2 flops per MAC)."""
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_flop_counts()["Global"][torch.ops.aten.convolution] // 2


@pytest.mark.parametrize(
    "build, params",
    [
        (lambda: EdgeResNet8(10), 10_586),
        (lambda: EdgeResNet8(100), 16_436),
        (FeatureExtractor, 464),
        (lambda: resnet55_server(10), 590_858),
        (lambda: resnet109_server(10), 1_147_274),
        (lambda: resnet56(10), 591_322),
        (lambda: resnet110(10), 1_147_738),
    ],
)
def test_parameter_counts_match_the_paper(build, params):
    assert count_parameters(build()) == params


@pytest.mark.parametrize(
    "build, in_ch, macs_m",
    [
        (lambda: EdgeResNet8(10), 3, 9.617),
        (lambda: resnet55_server(10), 16, 86.77),
        (lambda: resnet109_server(10), 16, 166.99),
        (lambda: resnet56(10), 3, 87.21),
        (lambda: resnet110(10), 3, 167.43),
    ],
)
def test_conv_multiply_adds_per_32x32_image(build, in_ch, macs_m):
    macs = conv_macs(build(), torch.zeros(1, in_ch, 32, 32))
    assert macs / 1e6 == pytest.approx(macs_m, abs=0.006)


def test_edge_forward_returns_logits_and_feature_map():
    logits, h = EdgeResNet8(10)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert h.shape == (2, 16, 32, 32)
    assert (h >= 0).all()  # post-ReLU: the codecs rely on it


def test_edge_plus_server_is_the_fedavg_model():
    """Extractor + ResNet-55 has exactly ResNet-56's structure and parameter count."""
    edge, server, full = EdgeResNet8(10), resnet55_server(10), resnet56(10)
    assert count_parameters(edge.extractor) + count_parameters(server) == count_parameters(full)
    ratio = conv_macs(resnet56(10), torch.zeros(1, 3, 32, 32)) / conv_macs(
        EdgeResNet8(10), torch.zeros(1, 3, 32, 32)
    )
    assert ratio == pytest.approx(9.07, abs=0.05)


def test_models_accept_smaller_inputs():
    logits, h = EdgeResNet8(10)(torch.randn(3, 3, 8, 8))
    assert h.shape == (3, 16, 8, 8)
    assert resnet55_server(10)(h).shape == (3, 10)


def test_unknown_server_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown server model 'resnet9'"):
        build_server("resnet9", 10)
