"""What ``gkt-export`` exported and the figures that verified it (written by ``--json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from export.verify import Comparison


@dataclass
class Parity:
    """onnxruntime fp32 against PyTorch: judged against float64, float32 shown beside it."""

    samples: int  # checked against float64 (delivery: the first 256; gkt-export: all)
    max_abs_diff: float  # vs PyTorch float64 (the checked figure)
    worst_ratio: float  # max |diff| / allowed (see export.verify); <= 1 passes
    mismatches: int
    rtol: float
    atol: float
    max_abs_diff_vs_torch_fp32: float | None
    torch_fp32_error: float | None  # PyTorch float32 vs float64: the floor of any fp32 run

    @classmethod
    def of(cls, c: Comparison, rtol: float, atol: float) -> Parity:
        return cls(c.parity_samples, c.max_abs_diff, c.worst_ratio, c.mismatches, rtol, atol,
                   c.max_abs_diff_baseline, c.baseline_error)


@dataclass
class Int8Report:
    path: str
    bytes: int
    calibration_samples: int
    calibration_method: str
    activations: str  # uint8 | int8
    # None where a check failed before the figures existed (see ``error``)
    accuracy_fp32: float | None  # the fp32 graph in onnxruntime, same samples
    accuracy_int8: float | None
    drop_points: float | None  # 100 * (fp32 - int8)
    agreement: float | None  # fraction of samples with the fp32 graph's top-1 class
    max_abs_diff_vs_fp32: float | None
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch size -> median
    error: str | None = None


@dataclass
class GraphReport:
    name: str
    kind: str
    device: str | None
    round: int | None
    path: str
    bytes: int
    input_name: str
    input_shape: list  # ["batch", C, S, S]
    output_name: str
    opset: int
    exporter: str
    ir_version: int
    parity: Parity | None  # None if a check failed before the comparison
    accuracy_torch: float | None  # classifiers only
    accuracy_onnx: float | None
    latency_ms: dict[str, float] = field(default_factory=dict)  # onnxruntime fp32
    int8: Int8Report | None = None
    error: str | None = None


@dataclass
class ExportReport:
    checkpoint: str
    round: int
    dataset: str
    num_classes: int
    image_size: int
    server_model: str
    opset: int
    exporter: str
    threads: int
    test_samples: int
    versions: dict[str, str]
    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        errs = []
        for g in self.graphs:
            errs += [e for e in (g.error, g.int8.error if g.int8 else None) if e]
        return errs

    @property
    def passed(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "errors": self.errors}

    def write_json(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
