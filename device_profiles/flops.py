"""FLOP counts behind our own functions, with the convention stated on every number.

- ``forward_flops``: fvcore's FlopCountAnalysis (jit trace of one forward pass). fvcore
  counts **one multiply-add as one flop** ("MACs"); by module and by operator.
- ``training_step_flops``: torch's FlopCounterMode over forward + backward of a
  cross-entropy loss. It counts **2 flops per multiply-add**, and only matmul/conv-like
  ops (no BN, ReLU or optimizer), so train ~ 3 x forward x 2 (the first conv needs no
  input gradient, hence slightly below 3).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FVCORE_CONVENTION = "fvcore: 1 flop = 1 multiply-add, forward pass only"
TORCH_CONVENTION = "torch FlopCounterMode: 2 flops per multiply-add, forward + backward"


@dataclass(frozen=True)
class ForwardFlops:
    """One forward pass of the given inputs (batch included), in multiply-adds."""

    total: int
    by_operator: dict[str, int]
    by_module: dict[str, int]  # "" is the whole model; dotted names as in named_modules()
    unsupported: dict[str, int]  # ops fvcore saw but has no counter for (elementwise adds)
    convention: str = FVCORE_CONVENTION


def forward_flops(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor],
                  module_depth: int | None = None) -> ForwardFlops:
    """fvcore's count of one eval-mode forward pass. ``module_depth`` keeps module names with
    at most that many dots (None: all)."""
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's jit tracing warns on every call
            from fvcore.nn import FlopCountAnalysis  # optional dependency: [profile] extra

            analysis = FlopCountAnalysis(model, args)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            total = int(analysis.total())
            by_op = {k: int(v) for k, v in analysis.by_operator().items()}
            by_mod = {k: int(v) for k, v in analysis.by_module().items()
                      if module_depth is None or k.count(".") < module_depth or k == ""}
            unsupported = {k: int(v) for k, v in analysis.unsupported_ops().items()}
    finally:
        model.train(was_training)
    return ForwardFlops(total, by_op, by_mod, unsupported)


def _logits(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def training_step_flops(model: nn.Module, inputs: torch.Tensor, num_classes: int) -> int:
    """FLOPs (2 per multiply-add) of forward + backward of CE loss on ``inputs`` (whole batch).
    Gradients are cleared afterwards, but BN running statistics move: use a throwaway model."""
    was_training = model.training
    model.train()
    targets = torch.randint(0, num_classes, (inputs.shape[0],), device=inputs.device)
    try:
        with FlopCounterMode(display=False) as counter:
            loss = F.cross_entropy(_logits(model(inputs)), targets)
            loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return int(counter.get_total_flops())


def forward_flops_torch(model: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward pass, by FlopCounterMode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
