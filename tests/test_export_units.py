"""Export pieces that need no trained model: options, tolerance rule, metadata, one graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edge_runtime.learning.models import EdgeResNet8, FeatureExtractor
from export.graphs import EdgeLogits, GraphSpec
from export.metadata import class_names, read_metadata, set_metadata
from export.onnx_export import ExportOptions, default_opset, export_graph, min_ir_version
from export.pipeline import ExportConfig
from export.runtime import make_session, run
from export.verify import (
    VerificationError,
    check_int8,
    check_parity,
    compare,
    output_scale,
    torch_predict,
)


def const(values):
    arr = np.asarray(values, dtype=np.float64)
    return lambda x: arr


def one_batch(n=2, labels=(0, 1)):
    return [(torch.zeros(n, 1), np.asarray(labels))]


def test_auto_exporter_follows_the_opset():
    assert ExportOptions(18).resolved_exporter == "dynamo"
    assert ExportOptions(21).resolved_exporter == "dynamo"
    assert ExportOptions(13).resolved_exporter == "torchscript"
    assert ExportOptions(18, "torchscript").resolved_exporter == "torchscript"


def test_dynamo_refuses_opsets_it_cannot_write():
    with pytest.raises(ValueError, match="opset >= 18"):
        ExportOptions(13, "dynamo")
    with pytest.raises(ValueError, match="unknown exporter"):
        ExportOptions(18, "jit")


def test_ir_version_is_the_oldest_that_has_the_opset():
    assert min_ir_version(13) == 7  # onnx 1.8: what onnxruntime 1.6-1.11 (JetPack 4) reads
    assert min_ir_version(18) == 8


def test_atol_scales_with_the_largest_output_of_each_sample():
    ref = np.array([[18.0, 0.01], [0.5, 0.01]])
    assert output_scale(ref).ravel().tolist() == [18.0, 1.0]
    # 5e-4 on a logit near 0 is float32 noise next to a logit of 18, not next to one of 0.5
    cand = ref + np.array([[0.0, 5e-4], [0.0, 5e-4]])
    c = compare(const(ref), const(cand), one_batch())
    assert c.mismatches == 1
    assert c.worst_ratio == pytest.approx(5e-4 / (1e-4 + 1e-4 * 0.01))


def test_parity_failure_is_an_error():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    check_parity("ok", compare(const(ref), const(ref + 1e-6), one_batch()), classifier=True)
    with pytest.raises(VerificationError, match="differs from PyTorch"):
        check_parity("g", compare(const(ref), const(ref + 1e-3), one_batch()), classifier=True)


def test_accuracy_must_match_even_within_tolerance():
    ref = np.array([[1.0, 1.0 + 1e-6], [0.0, 1.0]])  # a tie that the candidate breaks the other way
    cand = np.array([[1.0 + 1e-6, 1.0], [0.0, 1.0]])
    c = compare(const(ref), const(cand), one_batch(labels=(1, 1)))
    assert c.mismatches == 0 and c.correct_ref == 2 and c.correct_cand == 1
    with pytest.raises(VerificationError, match="top-1 accuracy differs"):
        check_parity("g", c, classifier=True)
    check_parity("g", c, classifier=False)  # feature maps have no accuracy


def test_int8_drop_is_checked_against_fp32():
    fp32 = np.eye(4)
    worse = np.eye(4)[[0, 1, 2, 0]]  # one of four samples wrong: 25 points
    batches = [(torch.zeros(4, 1), np.arange(4))]
    c = compare(const(fp32), const(worse), batches)
    assert (c.accuracy_ref(), c.accuracy_cand(), c.agreement()) == (1.0, 0.75, 0.75)
    check_int8("g", c, max_drop=0.25)
    with pytest.raises(VerificationError, match="25.00 points below fp32"):
        check_int8("g", c, max_drop=0.01)


def test_an_int8_drop_of_exactly_the_allowance_passes():
    """3 of 300 is one point exactly, though 0.5633 - 0.5533 is a hair over 0.01 in floats
    (a delivery withheld int8 for that: 'is 1.00 points below ... (allowed: 1.00)')."""
    labels = np.arange(300) % 3
    fp32 = np.eye(3)[labels]
    fp32[:131] = np.eye(3)[(labels[:131] + 1) % 3]  # 169 right: 0.5633
    int8 = fp32.copy()
    int8[131:134] = np.eye(3)[(labels[131:134] + 1) % 3]  # 3 fewer: 0.5533
    c = compare(const(fp32), const(int8), [(torch.zeros(300, 1), labels)])
    assert (c.correct_ref, c.correct_cand) == (169, 166)
    check_int8("g", c, max_drop=0.01)
    with pytest.raises(VerificationError, match="1.00 points below fp32"):
        check_int8("g", c, max_drop=0.0099)


def test_float64_reference_is_the_same_function():
    model = EdgeLogits(EdgeResNet8(10)).eval()
    x = torch.randn(4, 3, 8, 8)
    ref64, ref32 = torch_predict(model, torch.float64)(x), torch_predict(model)(x)
    assert ref64.dtype == np.float64
    np.testing.assert_allclose(ref32, ref64, rtol=1e-4, atol=1e-5)
    assert next(model.parameters()).dtype == torch.float32  # the float64 copy is separate


def test_class_names():
    assert class_names("digits", 10)[3] == "3"
    assert class_names("cifar10", 10)[0] == "airplane"
    assert class_names("cifar100", 100)[99] == "99"  # names need the dataset files


def test_metadata_replaces_keys_and_keeps_others():
    model = onnx.ModelProto()
    set_metadata(model, {"a": "1", "b": "2"})
    set_metadata(model, {"b": "3"})
    assert read_metadata(model) == {"a": "1", "b": "3"}


@pytest.mark.parametrize("opset, exporter, ir", [(13, "torchscript", 7), (18, "dynamo", 8)])
def test_export_keeps_eval_mode_and_batch_axis(opset, exporter, ir):
    torch.manual_seed(0)
    ext = FeatureExtractor()
    with torch.no_grad():  # BN statistics far from the defaults, so train mode would show
        ext[1].running_mean.uniform_(-1, 1)
        ext[1].running_var.uniform_(0.5, 2)
    ext.train()  # the exporter must not care what mode it is handed
    spec = GraphSpec("extractor_t", "extractor", ext, "image", "features", (3, 8, 8), "t", 0)
    model = export_graph(spec, torch.randn(2, 3, 8, 8), ExportOptions(opset))
    assert not any(m.training for m in ext.modules())  # TorchScript restores the mode it got
    assert default_opset(model) == opset and model.ir_version == ir
    onnx.checker.check_model(model, full_check=True)
    session = make_session(model.SerializeToString())
    for n in (1, 5):
        x = torch.randn(n, 3, 8, 8)
        np.testing.assert_allclose(run(session, x.numpy()), torch_predict(ext)(x),
                                   rtol=1e-4, atol=1e-5)


def test_int8_needs_a_qdq_opset_before_any_work():
    with pytest.raises(ValueError, match="opset >= 10"):
        ExportConfig("ckpt", "out", export=ExportOptions(9), quantize="int8")
    with pytest.raises(ValueError, match="unknown quantization"):
        ExportConfig("ckpt", "out", quantize="int4")


def test_parity_can_stop_at_n_samples_while_top1_counts_every_batch():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    calls = []

    def reference(x):
        calls.append(len(x))
        return ref

    batches = [(torch.zeros(2, 1), np.array([0, 1]))] * 3
    c = compare(reference, const(ref + 1e-6), batches, baseline=const(ref), parity_samples=2)
    assert calls == [2] and c.parity_samples == 2 and c.samples == 6
    assert c.correct_ref == c.correct_cand == 6 and c.mismatches == 0
    full = compare(const(ref), const(ref + 1e-6), batches, baseline=const(ref))
    assert full.parity_samples == 6
