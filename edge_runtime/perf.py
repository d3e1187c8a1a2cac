"""CPU speed settings for training and feature extraction, each kept because a benchmark
showed it helps (bench/bench_edge_cost.py, bench/bench_edge_tuning.py; numbers and what did
not help: docs/performance.md).

- channels_last: NHWC activations let oneDNN's convolutions and PyTorch's batch norm use
  their vectorised kernels (NCHW batch norm over 64 channels ran ~5x slower).
- ``keep_freed_memory``: glibc otherwise returns each step's activation buffers to the
  kernel and page-faults them back in, zero-filled, on the next step.
- ``inference_copy``: batch norm folded into the preceding convolution for extraction.
"""

from __future__ import annotations

import ctypes
import platform

import torch
from torch import nn

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on
# 64-bit systems (HEAP_MAX_SIZE / 2); blocks above it are always mmap'ed.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1 << 30

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks (up to 32 MB) in the heap for reuse instead of
    returning them to the kernel. Once per process; later calls do nothing.

    Without it, every training step of the edge model at batch 64 took ~20,000 minor page
    faults (the kernel zero-fills each page) and a third more CPU time. Peak RSS is reached
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
    """An eval-mode copy of ``model`` with each Conv2d -> BatchNorm2d folded into the conv
    (same outputs up to float rounding, ~1e-6); ``model`` itself is left untouched."""
    from torch.fx.experimental.optimization import fuse

    was_training = model.training
    model.eval()
    try:
        folded = fuse(model, inplace=False)
    finally:
        model.train(was_training)
    return to_channels_last(folded) if channels_last else folded
