"""Checkpoint -> ONNX graphs, each verified before it gets its final name.

A graph is written as ``.NAME.onnx.partial``, checked, compared with PyTorch, and only
then renamed to ``NAME.onnx``; one that fails is kept as ``NAME.failed.onnx`` for
inspection. So every ``*.onnx`` in the output folder passed verification.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.graphs import (
    IMAGE_INPUT,
    KINDS,
    GraphSpec,
    build_specs,
    extractor_module,
    load_edge_state,
)
from export.metadata import accuracy_metadata, graph_metadata, set_metadata
from export.onnx_export import ExportOptions, export_graph
from export.quantize import PER_CHANNEL_MIN_OPSET, QDQ_MIN_OPSET, QuantConfig, quantize_int8
from export.report import ExportReport, GraphReport, Int8Report, Parity
from export.runtime import median_ms, run
from export.samples import samples_for
from export.verify import (
    ATOL,
    RTOL,
    Batches,
    Comparison,
    Predict,
    VerificationError,
    check_int8,
    check_model,
    check_parity,
    compare,
    load_session,
    torch_predict,
)
from server_hub.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger("gkt.export")

QUANTIZE = ("int8",)
QUANTIZABLE = ("edge", "composed")  # image -> logits graphs, the ones a device runs whole


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str  # a round folder, a hub state dir, or its checkpoints/ folder
    out_dir: str
    devices: tuple[str, ...] = ()  # extractor + composed for these; () = all in the checkpoint
    edge_states: tuple[str, ...] = ()  # device state dirs whose edge model to export
    data_root: str = "data"
    test_data: str | None = None  # own-data runs: the hub's held-out folder (CLASS/IMAGE)
    export: ExportOptions = field(default_factory=ExportOptions)
    quantize: str | None = None  # None | "int8"
    quant: QuantConfig = field(default_factory=QuantConfig)
    max_int8_drop: float = 0.01  # allowed top-1 drop of int8 vs fp32 (0.01 = 1 point)
    test_samples: int = 0  # 0 = the whole test split
    parity_samples: int = 0  # float64 parity on the first N test samples; 0 = all of them
    batch_size: int = 64
    threads: int = 1  # onnxruntime intra-op threads (the CLI sets torch's too)
    latency_batches: tuple[int, ...] = (1, 64)
    latency_runs: int = 20
    rtol: float = RTOL
    atol: float = ATOL
    kinds: tuple[str, ...] = KINDS  # which kinds of graph to write (model delivery: composed)
    run_id: str | None = None  # the run the checkpoint belongs to (else its meta's run_id)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"unknown graph kinds {sorted(unknown)}; choose from {KINDS}")
        if self.quantize not in (None, *QUANTIZE):
            raise ValueError(f"unknown quantization {self.quantize!r}; choose from {QUANTIZE}")
        if self.quantize and self.export.opset < QDQ_MIN_OPSET:
            raise ValueError(f"int8 QDQ needs opset >= {QDQ_MIN_OPSET}, got {self.export.opset}")
        if self.threads < 1 or self.batch_size < 1 or self.latency_runs < 1:
            raise ValueError("threads, batch_size and latency_runs must be >= 1")


def resolve_checkpoint(path: Path) -> Checkpoint:
    """Also accept the ``checkpoints/`` folder itself (the one holding LATEST)."""
    path = Path(path)
    marker = path / "LATEST"
    if marker.exists() and not (path / "meta.json").exists():
        path = path / marker.read_text().strip()
    return load_checkpoint(path)


@dataclass
class _Data:
    test_x: torch.Tensor
    test_y: np.ndarray
    calib_x: torch.Tensor | None
    feature_makers: list[torch.nn.Module]  # extractors that feed the server graph


def _batches(spec: GraphSpec, data: _Data, batch_size: int) -> Iterator:
    """Test batches in the graph's input space: images, or H from each device's extractor."""
    makers = [None] if spec.kind in IMAGE_INPUT else data.feature_makers
    for maker in makers:
        for i in range(0, len(data.test_y), batch_size):
            x = data.test_x[i:i + batch_size]
            if maker is not None:
                with torch.inference_mode():
                    x = maker(x)
            yield x, data.test_y[i:i + batch_size]


def _first(batches: Batches, n: int) -> torch.Tensor:
    """The first ``n`` inputs, repeated if the test set is smaller (latency needs full batches)."""
    x = next(iter(batches))[0]
    reps = -(-n // len(x))
    return x.repeat(reps, 1, 1, 1)[:n].contiguous()


def _latency(session: ort.InferenceSession, spec: GraphSpec, data: _Data,
             cfg: ExportConfig) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in cfg.latency_batches:
        x = _first(_batches(spec, data, max(cfg.latency_batches)), b).numpy()
        out[str(b)] = round(median_ms(lambda x=x: run(session, x), cfg.latency_runs), 4)
    return out


def _partial(out: Path, stem: str) -> Path:
    return out / f".{stem}.onnx.partial"


def _finish(out: Path, stem: str, error: str | None) -> Path:
    """Give the checked file its final name: ``STEM.onnx``, or ``STEM.failed.onnx``."""
    target = out / (f"{stem}.onnx" if error is None else f"{stem}.failed.onnx")
    _partial(out, stem).replace(target)
    return target


@dataclass
class _Checked:
    session: ort.InferenceSession | None
    cmp: Comparison | None
    error: str | None


def _check(partial: Path, reference: Predict, batches: Batches, cfg: ExportConfig,
           judge: Callable[[Comparison], None], baseline: Predict | None = None,
           parity_samples: int = 0) -> _Checked:
    """Checker, load, compare with ``reference`` on every batch, then ``judge`` the figures."""
    session = cmp = None
    try:
        check_model(partial)
        session = load_session(partial, cfg.threads)
        cmp = compare(reference, lambda x: run(session, x.numpy()), batches, cfg.rtol, cfg.atol,
                      baseline, parity_samples)
        judge(cmp)
    except VerificationError as err:
        return _Checked(session, cmp, str(err))
    return _Checked(session, cmp, None)


def _export_one(spec: GraphSpec, ckpt: Checkpoint, data: _Data, cfg: ExportConfig,
                out: Path) -> GraphReport:
    opts = cfg.export
    model = export_graph(spec, next(iter(_batches(spec, data, 2)))[0], opts)
    set_metadata(model, graph_metadata(spec, ckpt.meta, opts.opset, opts.resolved_exporter,
                                       cfg.run_id))
    partial = _partial(out, spec.name)
    onnx.save(model, str(partial))
    res = _check(partial, torch_predict(spec.module, torch.float64),
                 _batches(spec, data, cfg.batch_size), cfg,
                 lambda c: check_parity(spec.name, c, spec.is_classifier, cfg.rtol, cfg.atol),
                 baseline=torch_predict(spec.module), parity_samples=cfg.parity_samples)
    if res.error is None and spec.is_classifier:  # what it scored, in the file itself
        set_metadata(model, accuracy_metadata(res.cmp.accuracy_cand(), res.cmp.samples))
        onnx.save(model, str(partial))
    path = _finish(out, spec.name, res.error)
    cmp, classifier = res.cmp, spec.is_classifier
    report = GraphReport(
        spec.name, spec.kind, spec.device, spec.round, str(path), path.stat().st_size,
        spec.input_name, ["batch", *spec.input_shape], spec.output_name, opts.opset,
        opts.resolved_exporter, model.ir_version,
        Parity.of(cmp, cfg.rtol, cfg.atol) if cmp else None,
        cmp.accuracy_ref() if cmp and classifier else None,
        cmp.accuracy_cand() if cmp and classifier else None,
        error=res.error,
    )
    log.info("%s: %s", spec.name, res.error or f"verified, max abs diff {cmp.max_abs_diff:.2g}")
    if res.error is None:
        report.latency_ms = _latency(res.session, spec, data, cfg)
        if cfg.quantize and spec.kind in QUANTIZABLE:
            report.int8 = _quantize_one(spec, path, res.session, data, cfg, out)
    return report


def _quantize_one(spec: GraphSpec, fp32: Path, fp32_session: ort.InferenceSession, data: _Data,
                  cfg: ExportConfig, out: Path) -> Int8Report:
    model = quantize_int8(fp32, data.calib_x.numpy(), cfg.quant)
    per_channel = cfg.export.opset >= PER_CHANNEL_MIN_OPSET
    set_metadata(model, {"quantization": json.dumps({
        "format": "QDQ", "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
        "activations": cfg.quant.activations,
        "calibration": cfg.quant.method, "calibration_samples": len(data.calib_x)})})
    stem = f"{spec.name}.int8"
    partial = _partial(out, stem)
    onnx.save(model, str(partial))
    res = _check(partial, lambda x: run(fp32_session, x.numpy()),
                 _batches(spec, data, cfg.batch_size), cfg,
                 lambda c: check_int8(spec.name, c, cfg.max_int8_drop))
    if res.error is None:
        set_metadata(model, accuracy_metadata(res.cmp.accuracy_cand(), res.cmp.samples))
        onnx.save(model, str(partial))
    path = _finish(out, stem, res.error)
    cmp = res.cmp
    log.info("%s int8: %s", spec.name, res.error or f"accuracy {cmp.accuracy_cand():.4f}")
    report = Int8Report(
        str(path), path.stat().st_size, len(data.calib_x), cfg.quant.method,
        cfg.quant.activations,
        cmp.accuracy_ref() if cmp else None, cmp.accuracy_cand() if cmp else None,
        round(100 * (cmp.accuracy_ref() - cmp.accuracy_cand()), 4) if cmp else None,
        cmp.agreement() if cmp else None, cmp.max_abs_diff if cmp else None, error=res.error)
    if res.error is None:
        report.latency_ms = _latency(res.session, spec, data, cfg)
    return report


def run_export(cfg: ExportConfig) -> ExportReport:
    """Export, verify and (optionally) quantize every graph; never raises for a failed check:
    failures are in ``report.errors`` (and the graph is left as ``*.failed.onnx``)."""
    ckpt = resolve_checkpoint(Path(cfg.checkpoint))
    devices = list(cfg.devices) or sorted(ckpt.extractors)
    edges = [load_edge_state(Path(d)) for d in cfg.edge_states]
    specs = [s for s in build_specs(ckpt, devices, edges) if s.kind in cfg.kinds]
    got = samples_for(ckpt.meta, cfg.data_root, cfg.test_data, cfg.test_samples,
                      cfg.quant.calibration_samples if cfg.quantize else 0)
    test_y = got.test_y
    data = _Data(got.test_x, test_y, got.calib_x, [extractor_module(ckpt, d) for d in devices])
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = ckpt.meta
    report = ExportReport(
        str(ckpt.path), ckpt.round, meta["dataset"], int(meta["num_classes"]),
        int(meta["image_size"]), meta["server_model"], cfg.export.opset,
        cfg.export.resolved_exporter, cfg.threads, len(test_y),
        {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    )
    for spec in specs:
        report.graphs.append(_export_one(spec, ckpt, data, cfg, out))
    return report
