"""ONNX graphs: parameters, size and per-sample multiply-adds read from the file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_profiles.onnx_graph import onnx_profile


def _graph(path):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    fc = numpy_helper.from_array(np.ones((4 * 8 * 8, 10), np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_onnx_profile_counts_params_and_macs(tmp_path):
    path = tmp_path / "tiny.onnx"
    _graph(path)
    p = onnx_profile(path)
    assert p.params == 4 * 27 + 256 * 10
    assert p.initializer_bytes == 4 * p.params
    assert p.macs_per_sample == 4 * 8 * 8 * 27 + 256 * 10  # dynamic batch counts as 1
    assert p.ops == {"Conv": 1, "Relu": 1, "Flatten": 1, "MatMul": 1}
    assert p.inputs == {"x": ["batch", 3, 8, 8]}
    assert p.file_bytes == path.stat().st_size


def test_missing_onnx_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        onnx_profile(tmp_path / "nope.onnx")
