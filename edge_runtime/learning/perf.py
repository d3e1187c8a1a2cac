"""CPU speed settings for training and feature extraction, each kept because a benchmark
showed it helps (bench/bench_edge_cost.py, bench/bench_edge_tuning.py; numbers and what did
not help: docs/performance.md).

- channels_last: NHWC activations let oneDNN's convolutions and PyTorch's batch norm use
  their vectorised kernels (NCHW batch norm over 64 channels ran ~5x slower).
- ``keep_freed_memory``: glibc otherwise returns each step's activation buffers to the
  kernel and page-faults them back in, zero-filled, on the next step.
- ``inference_copy``: batch norm folded into the preceding convolution for extraction.
- ``precision="bf16"``: autocast convolutions and linears to bfloat16 where the CPU has
  native bf16 (AVX512-BF16, AMX); the batch norms then read and write half the bytes, and
  they are most of the edge's step. Opt-in: it changes results at bf16 rounding (~1e-2).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import platform

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on
# 64-bit systems (HEAP_MAX_SIZE / 2); blocks above it are always mmap'ed.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1 << 30

_kept = False

PRECISIONS = ("fp32", "bf16", "auto")


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (x86 AVX512-BF16/AMX, some ARMv8.6+);
    elsewhere (a Raspberry Pi 4's Cortex-A72) bf16 would be emulated and slower."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """"auto" -> "bf16" on a CUDA device or a CPU with native bf16, else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" or cpu_has_bf16() else "fp32"


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass: bf16 matmuls/convs, fp32 weights and optimizer.
    Losses should be computed outside it, on ``.float()`` outputs."""
    if resolve_precision(precision, device_type) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks (up to 32 MB) in the heap for reuse instead of
    returning them to the kernel. Once per process; later calls do nothing.

    Without it, every training step of the edge model at batch 64 took ~20,000 minor page
    faults here (the kernel zero-fills each page) and a third more CPU time; glibc's
    thresholds adapt at run time, so other machines see anywhere from 0 to that. Peak RSS is reached
    within a step either way; what changes is that the heap is not trimmed afterwards.
    Returns whether the setting is in effect (False on non-glibc systems: musl, macOS).
    """
    global _kept
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    # Both are needed: setting only the trim threshold also fixes the mmap threshold at
    # its 128 KB default, so every activation buffer would be mmap'ed (4x the faults).
    _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _kept


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store 4-d parameters NHWC, in place (the optimizer keeps the same Parameter objects)."""
    return model.to(memory_format=torch.channels_last)


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def inference_copy(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` with batch norm folded into the convolution before it
    (same outputs up to float rounding, ~1e-6); ``model`` itself is left untouched.

    Folds Conv2d -> BatchNorm2d pairs that are adjacent in an ``nn.Sequential`` and the
    convN/bnN pairs of ResNet blocks (ours and torchvision's), which covers every model
    here; any other batch norm stays, in eval mode. Not torch.fx: its tracing patches
    ``nn.Module.__call__`` for the whole process, which broke devices training in other
    threads.
    """
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                _fold(module, first, second)
        else:  # ResNet blocks (ours, torchvision's BasicBlock/Bottleneck): convN -> bnN
            for i in (1, 2, 3):
                if hasattr(module, f"conv{i}") and hasattr(module, f"bn{i}"):
                    _fold(module, f"conv{i}", f"bn{i}")
    return to_channels_last(folded) if channels_last else folded


def _fold(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Identity())
