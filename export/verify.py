"""Checks that decide whether an exported graph may ship. A failed check raises.

1. ``onnx.checker`` (full check, with shape inference) on the file as written, plus the
   graph contract: one input and one output, a dynamic batch axis, standard ONNX ops only.
2. onnxruntime against PyTorch on real test samples: every output element within
   ``atol * scale + rtol * |torch|`` with scale = max(1, max |torch|) of its sample
   (numpy's allclose rule for outputs up to 1), and for classifiers the same top-1
   accuracy on the test set. Judged against the module run in float64, the exact answer
   of the same weights: on the digits ResNet-56 (logits up to 18), float32 PyTorch is
   itself up to 2.7e-5 off and onnxruntime up to 2.8e-5 (~1.5e-6 of the largest logit);
   the two float32 runs differ by up to 3.9e-5, and a plain elementwise 1e-5 fails on
   logits near 0 for every float32 runtime, PyTorch included. A composed graph of a GKT
   run was 4.1e-5 off, so atol is 1e-4: export bugs are off by 1e-2 and more.
3. For int8 graphs: top-1 accuracy within ``max_drop`` of the fp32 graph.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from torch import nn

from export.onnx_export import BATCH
from export.runtime import make_session

RTOL = 1e-4
ATOL = 1e-4  # 1e-5 refused a GKT-trained composed graph 4.1e-5 off (fp32 noise)
STANDARD_DOMAINS = ("", "ai.onnx")

# what onnxruntime raises for a graph it cannot load or run (none derive from RuntimeError)
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidGraph, ort_state.InvalidArgument,
              ort_state.InvalidProtobuf, ort_state.NotImplemented, ort_state.RuntimeException)

Batches = Iterable[tuple[torch.Tensor, np.ndarray]]
Predict = Callable[[torch.Tensor], np.ndarray]


class VerificationError(RuntimeError):
    """An exported graph failed a check; it must not be used."""


@dataclass
class Comparison:
    """A candidate's outputs against a reference's over the same batches (streamed).

    Top-1 figures compare the candidate with the *baseline* (the reference if none):
    parity is judged against PyTorch in float64, accuracy against PyTorch in float32.
    """

    samples: int = 0
    parity_samples: int = 0  # samples also run through the reference (parity checked)
    max_abs_diff: float = 0.0  # candidate vs reference
    worst_ratio: float = 0.0  # max |diff| / allowed; <= 1 means within tolerance
    mismatches: int = 0  # output elements outside tolerance
    correct_ref: int = 0  # top-1 correct of the baseline
    correct_cand: int = 0
    agree: int = 0  # samples where candidate and baseline pick the same class
    max_abs_diff_baseline: float | None = None  # candidate vs baseline
    baseline_error: float | None = None  # baseline vs reference: float32's own error

    def accuracy_ref(self) -> float:
        return self.correct_ref / max(self.samples, 1)

    def accuracy_cand(self) -> float:
        return self.correct_cand / max(self.samples, 1)

    def agreement(self) -> float:
        return self.agree / max(self.samples, 1)


def torch_predict(module: nn.Module, dtype: torch.dtype = torch.float32) -> Predict:
    """PyTorch eval-mode outputs; float64 gives the exact answer of the same weights."""
    module = module.eval() if dtype == torch.float32 else copy.deepcopy(module).to(dtype).eval()

    @torch.inference_mode()
    def predict(x: torch.Tensor) -> np.ndarray:
        return module(x.to(dtype)).numpy()

    return predict


def output_scale(ref: np.ndarray) -> np.ndarray:
    """Per sample max(1, max |ref|), broadcastable to ``ref``.

    float32 error in an output is relative to the magnitudes that produced it, not to
    the output's own value: a logit near 0 next to one of 18 carries the error of the
    18. So atol applies to outputs scaled to at most 1 (numpy's rule where |ref| <= 1).
    """
    peak = np.abs(ref).reshape(len(ref), -1).max(axis=1)
    return np.maximum(peak, 1.0).reshape((len(ref),) + (1,) * (ref.ndim - 1))


def _max(current: float | None, diff: np.ndarray) -> float:
    return max(current or 0.0, float(diff.max()))


def compare(reference: Predict, candidate: Predict, batches: Batches, rtol: float = RTOL,
            atol: float = ATOL, baseline: Predict | None = None,
            parity_samples: int = 0) -> Comparison:
    """Run all on every batch; top-1 counts are meaningful for classifiers only.
    ``parity_samples`` > 0 (with a baseline): the reference runs on the first batches up
    to that many samples only (float64 is the slow part); top-1 covers every batch."""
    c = Comparison()
    for x, y in batches:
        check = baseline is None or not parity_samples or c.parity_samples < parity_samples
        try:
            cand = candidate(x).astype(np.float64)
        except ORT_ERRORS as err:
            raise VerificationError(f"onnxruntime failed on a batch of shape "
                                    f"{tuple(x.shape)}: {err}") from err
        c.samples += len(x)
        base = ref = reference(x).astype(np.float64) if check else None
        if baseline is not None:
            base = baseline(x).astype(np.float64)
            c.max_abs_diff_baseline = _max(c.max_abs_diff_baseline, np.abs(cand - base))
        if base.shape != cand.shape:
            raise VerificationError(f"output shape {cand.shape}, expected {base.shape}")
        if ref is not None:
            c.parity_samples += len(x)
            diff = np.abs(cand - ref)
            allowed = atol * output_scale(ref) + rtol * np.abs(ref)
            c.max_abs_diff = _max(c.max_abs_diff, diff)
            with np.errstate(divide="ignore", invalid="ignore"):  # 0 only if tol is 0
                c.worst_ratio = _max(c.worst_ratio, np.where(diff > 0, diff / allowed, 0.0))
            c.mismatches += int((diff > allowed).sum())
            if baseline is not None:
                c.baseline_error = _max(c.baseline_error, np.abs(base - ref))
        if base.ndim == 2:
            top_base, top_cand = base.argmax(1), cand.argmax(1)
            c.correct_ref += int((top_base == y).sum())
            c.correct_cand += int((top_cand == y).sum())
            c.agree += int((top_base == top_cand).sum())
    if c.samples == 0:
        raise VerificationError("no samples to verify with")
    return c


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def check_model(path: Path) -> None:
    """onnx.checker plus the contract every exported graph keeps."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise VerificationError(f"{path.name}: onnx.checker failed: {err}") from err
    graph = onnx.load(str(path), load_external_data=False).graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise VerificationError(f"{path.name}: expected one input and one output, got "
                                f"{len(graph.input)} and {len(graph.output)}")
    for value in (graph.input[0], graph.output[0]):
        if _dims(value)[0] != BATCH:
            raise VerificationError(f"{path.name}: {value.name} has shape {_dims(value)}; "
                                    f"axis 0 must be the dynamic axis {BATCH!r}")
    custom = sorted({n.domain for n in graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise VerificationError(f"{path.name}: non-standard operator domains {custom} "
                                f"(runtime-specific; would not load elsewhere)")


def load_session(path: Path, threads: int) -> ort.InferenceSession:
    try:
        return make_session(path, threads)
    except ORT_ERRORS as err:
        raise VerificationError(f"{path.name}: onnxruntime cannot load it: {err}") from err


def check_parity(name: str, c: Comparison, classifier: bool, rtol: float = RTOL,
                 atol: float = ATOL) -> None:
    if c.mismatches:
        raise VerificationError(
            f"{name}: onnxruntime differs from PyTorch (float64) in {c.mismatches} output "
            f"values (max abs diff {c.max_abs_diff:.3g}, {c.worst_ratio:.1f}x the tolerance "
            f"rtol={rtol:g}, atol={atol:g}) on {c.parity_samples} test samples")
    if classifier and c.correct_ref != c.correct_cand:
        raise VerificationError(
            f"{name}: top-1 accuracy differs: PyTorch {c.accuracy_ref():.4f}, onnxruntime "
            f"{c.accuracy_cand():.4f} on {c.samples} test samples")


def check_int8(name: str, c: Comparison, max_drop: float) -> None:
    """``c`` compares the int8 graph (candidate) against the fp32 graph (reference)."""
    # in whole samples: 0.5633 - 0.5533 is 0.0100000001 in floats, 3 of 300 exactly a point
    lost = c.correct_ref - c.correct_cand
    drop = lost / c.samples if c.samples else 0.0
    if lost > max_drop * c.samples + 1e-9:
        raise VerificationError(
            f"{name}: int8 top-1 accuracy {c.accuracy_cand():.4f} is {100 * drop:.2f} points "
            f"below fp32 {c.accuracy_ref():.4f} (allowed: {100 * max_drop:.2f})")
