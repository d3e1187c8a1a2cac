"""int8 static quantization (QDQ format) calibrated on real training samples.

Static, not dynamic: dynamic quantization recomputes activation scales at run time
and slowed this CNN ~5x on CPU. QDQ keeps standard ONNX ops (QuantizeLinear /
DequantizeLinear around float ops), so any runtime can load it; onnxruntime fuses the
pairs into int8 kernels at load time on the target.

Activations are uint8 by default (weights int8, "U8S8"): measured on x86 (AVX-512 VNNI),
onnxruntime fuses every Conv and Add into QLinearConv/QLinearAdd (one run measured the
digits ResNet-56 2.8x faster than fp32 at batch 64; later runs on the same machine at
32x32 measured 0.40-1.09x: docs/export.md), while int8 activations left 22 of 58 convs
in float with 36 layout Transposes around the rest, slower than fp32. TensorRT (Jetson)
takes symmetric int8 activations only: ``activations="int8"`` (zero point 0) is for it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.onnx_export import default_opset

QDQ_MIN_OPSET = 10
PER_CHANNEL_MIN_OPSET = 13  # the axis attribute of (De)QuantizeLinear
ACTIVATIONS = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


@dataclass(frozen=True)
class QuantConfig:
    calibration_samples: int = 512
    method: str = "minmax"
    activations: str = "uint8"  # uint8: onnxruntime CPU; int8 (symmetric): TensorRT
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"unknown activation type {self.activations!r}; "
                             f"choose from {sorted(ACTIVATIONS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; "
                             f"choose from {sorted(METHODS)}")
        if self.calibration_samples < 1:
            raise ValueError("need at least one calibration sample")


class ArrayReader(CalibrationDataReader):
    """Feeds calibration batches of one input to the quantizer."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int) -> None:
        self._batches = iter([{input_name: np.ascontiguousarray(data[i:i + batch_size])}
                              for i in range(0, len(data), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(fp32: Path, calibration: np.ndarray, cfg: QuantConfig) -> onnx.ModelProto:
    """The int8 QDQ model of the fp32 graph at ``fp32``, calibrated on ``calibration``.

    Pre-processing folds and fuses at onnxruntime's *basic* level only (constant folding,
    Conv+BN/Mul/Add fusion: standard ops, portable), so BN is folded before its weights
    are quantized; the CPU-specific levels run on the target at load time.
    """
    model = onnx.load(str(fp32))
    opset = default_opset(model)
    if opset < QDQ_MIN_OPSET:
        raise ValueError(f"int8 QDQ needs opset >= {QDQ_MIN_OPSET}, the graph has {opset}")
    input_name = model.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="gkt-quant-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(pre))
        quantize_static(
            str(pre), str(out), ArrayReader(input_name, calibration, cfg.batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=opset >= PER_CHANNEL_MIN_OPSET,
            activation_type=ACTIVATIONS[cfg.activations],
            weight_type=QuantType.QInt8,
            calibrate_method=METHODS[cfg.method],
            extra_options={"ActivationSymmetric": cfg.activations == "int8"},
        )
        quantized = onnx.load(str(out))
    got = default_opset(quantized)
    if got != opset:
        raise ValueError(f"quantization changed the opset from {opset} to {got}")
    _drop_unused_domains(quantized)
    return quantized


def _drop_unused_domains(model: onnx.ModelProto) -> None:
    """Pre-processing declares every domain onnxruntime knows (com.microsoft, ai.onnx.ml 5,
    ...); an older runtime refuses opsets it does not know even when no node uses them."""
    used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
    keep = [op for op in model.opset_import if op.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
