"""torch -> ONNX with the exporter that can actually produce the requested opset.

torch 2.14's dynamo exporter (``torch.export`` + onnxscript) implements opset 18 and
newer only: asked for less, it tries a version conversion that fails on these CNNs
(ReduceMean's axes) and silently keeps opset 18. Older runtimes (JetPack 4: TensorRT
8.x, onnxruntime <= 1.11) need opset <= 13-15, which only the legacy TorchScript exporter
writes. So ``auto`` picks dynamo for opset >= 18 and TorchScript below, and every result
is checked for the opset it really carries.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import onnx
import torch
from onnx import helper

from export.graphs import GraphSpec

EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18
DEFAULT_OPSET = 18
BATCH = "batch"  # name of the dynamic batch dimension in every graph


class ExportError(RuntimeError):
    """The exporter could not produce the graph that was asked for."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    exporter: str = "auto"  # auto | dynamo | torchscript

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"unknown exporter {self.exporter!r}; choose from {EXPORTERS}")
        if self.opset < 7:
            raise ValueError(f"opset must be >= 7 (the oldest onnxruntime supports), "
                             f"got {self.opset}")
        if self.exporter == "dynamo" and self.opset < DYNAMO_MIN_OPSET:
            raise ValueError(f"the dynamo exporter writes opset >= {DYNAMO_MIN_OPSET} only; use "
                             f"--exporter torchscript (or auto) for opset {self.opset}")

    @property
    def resolved_exporter(self) -> str:
        if self.exporter != "auto":
            return self.exporter
        return "dynamo" if self.opset >= DYNAMO_MIN_OPSET else "torchscript"


def min_ir_version(opset: int) -> int:
    """IR version of the first ONNX release with this opset: what an old runtime can read.

    Exporters stamp the newest IR they know (dynamo: IR 10 at opset 18); onnxruntime
    before 1.18 refuses IR 10 although nothing in these graphs needs it.
    """
    return min(row[1] for row in helper.VERSION_TABLE if row[2] == opset)


def default_opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def _dynamo(spec: GraphSpec, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    program = torch.onnx.export(
        spec.module, (example,), dynamo=True, opset_version=opset,
        input_names=[spec.input_name], output_names=[spec.output_name],
        dynamic_shapes=({0: torch.export.Dim(BATCH)},), external_data=False, verbose=False,
    )
    return program.model_proto


def _torchscript(spec: GraphSpec, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # chosen on purpose for opsets the dynamo exporter cannot write
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                module=r"torch\.onnx\._internal\.torchscript_exporter")
        torch.onnx.export(
            spec.module, (example,), buf, dynamo=False, opset_version=opset,
            input_names=[spec.input_name], output_names=[spec.output_name],
            dynamic_axes={spec.input_name: {0: BATCH}, spec.output_name: {0: BATCH}},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def export_graph(spec: GraphSpec, example: torch.Tensor, opts: ExportOptions) -> onnx.ModelProto:
    """Export ``spec.module`` in eval mode; ``example`` is a real batch (size >= 2).

    A batch of 1 would let torch.export specialise the batch axis to a constant.
    """
    if example.shape[0] < 2:
        raise ValueError("export needs an example batch of at least 2 samples")
    if tuple(example.shape[1:]) != spec.input_shape:
        raise ValueError(f"{spec.name}: example has shape {tuple(example.shape[1:])}, "
                         f"the graph takes {spec.input_shape}")
    spec.module.eval()  # the legacy exporter restores the module's mode after exporting
    exporter = opts.resolved_exporter
    with torch.no_grad():
        model = (_dynamo if exporter == "dynamo" else _torchscript)(spec, example, opts.opset)
    got = default_opset(model)
    if got != opts.opset:
        raise ExportError(f"{spec.name}: asked for opset {opts.opset}, the {exporter} exporter "
                          f"wrote opset {got}")
    model.ir_version = min(model.ir_version, min_ir_version(opts.opset))
    return model
