"""Profiles of exported ONNX graphs (``gkt-export`` output), read from the file with onnx.

Parameters and bytes come from the graph's initializers; multiply-adds per sample from
onnx shape inference over Conv/ConvTranspose/Gemm/MatMul (symbolic dimensions such as a
dynamic batch count as 1, so the figure is per sample; same convention as fvcore: 1 flop
= 1 multiply-add). Quantized (QDQ) graphs count their int8 weights as parameters too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OnnxProfile:
    path: str
    file_bytes: int
    params: int
    initializer_bytes: int
    macs_per_sample: int
    ops: dict[str, int]
    inputs: dict[str, list[int | str]]


def _dims(value_info) -> list[int | str]:  # noqa: ANN001 - an onnx ValueInfoProto
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _numeric(dims: list[int | str]) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else 1 for d in dims]


def onnx_profile(path: str | Path) -> OnnxProfile:
    import onnx
    from onnx import helper, shape_inference

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    model = onnx.load(str(path))
    graph = model.graph
    params = sum(math.prod(t.dims) for t in graph.initializer)
    init_bytes = sum(math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                     for t in graph.initializer)
    inferred = shape_inference.infer_shapes(model).graph
    shapes: dict[str, list[int | str]] = {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        shapes[vi.name] = _dims(vi)
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    macs = 0
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and out:
                macs += math.prod(_numeric(out)[1:]) * math.prod(_numeric(w)[1:])
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and out:
                k = _numeric(a)[0 if _transposed_a(node) else -1]
                macs += math.prod(_numeric(out)[1:]) * k
    inputs = {vi.name: _dims(vi) for vi in graph.input
              if vi.name not in {t.name for t in graph.initializer}}
    return OnnxProfile(str(path), path.stat().st_size, int(params), int(init_bytes), int(macs),
                       dict(Counter(n.op_type for n in graph.node)), inputs)


def _transposed_a(node) -> bool:  # noqa: ANN001 - an onnx NodeProto
    return node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
