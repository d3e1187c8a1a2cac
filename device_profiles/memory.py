"""Memory of training, measured three ways (tracemalloc does not see torch's allocator):

- ``saved_activations``: saved-tensor hooks record every tensor autograd keeps for the
  backward pass (deduplicated by storage, parameters and inputs excluded), at batch 1 and
  2, which splits it into a per-sample and a fixed part.
- ``allocator_peak``: torch.profiler(profile_memory=True) reports, with every allocation,
  the allocator's running total; its maximum is the peak of live torch memory.
- ``runtime_footprint``: the RSS of fresh Python processes (nothing, ``import torch``, the
  whole device stack), measured in subprocesses so this process's state does not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes autograd saves for backward, and the largest single module output."""

    saved_per_sample: int
    saved_fixed: int  # independent of the batch (e.g. BN's saved mean and inverse std)
    largest_output_per_sample: int

    def saved_at(self, batch: int) -> int:
        return self.saved_fixed + batch * self.saved_per_sample


def _storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage; works for meta tensors, whose data_ptr is always 0."""
    return t.untyped_storage()._cdata


def _saved_bytes(model: nn.Module, x: torch.Tensor, num_classes: int) -> tuple[int, int]:
    """(bytes saved for backward, largest leaf-module output in bytes) for one forward."""
    skip = {_storage_key(p) for p in model.parameters()} | {_storage_key(x)}
    saved: dict[int, int] = {}
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in skip:
            saved[key] = t.untyped_storage().nbytes()
        return t

    def on_output(_m: nn.Module, _inp: object, out: object) -> None:
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel() * out.element_size())

    hooks = [m.register_forward_hook(on_output) for m in model.modules()
             if not list(m.children())]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            F.cross_entropy(logits, torch.randint(0, num_classes, (len(x),), device=x.device))
    finally:
        for h in hooks:
            h.remove()
    return sum(saved.values()), largest


def saved_activations(model: nn.Module, input_shape: tuple[int, ...],
                      num_classes: int) -> ActivationMemory:
    """Activation memory of ``model`` in training mode, at batch 2 and 4 (BN in train mode
    needs more than one value per channel). Pass a model on the meta device to count
    without computing; a real one has its BN statistics moved (use a throwaway model)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    try:
        s1, _ = _saved_bytes(model, torch.randn(2, *input_shape, device=device), num_classes)
        s2, largest2 = _saved_bytes(model, torch.randn(4, *input_shape, device=device),
                                    num_classes)
    finally:
        model.train(was_training)
    per_sample = (s2 - s1) // 2
    return ActivationMemory(per_sample, max(s1 - 2 * per_sample, 0), largest2 // 4)


def allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of live CPU torch memory while ``fn`` runs (allocations made before are
    not counted, so build the model inside ``fn`` to include it)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            peak = max(peak, event.extra_fields.total_allocated)
        stack.extend(event.children)
    return peak


@dataclass(frozen=True)
class MeasuredPeak:
    """Training memory measured in a fresh process (``memory_probe``)."""

    model: str
    batch: int
    steps: int
    allocator_peak_bytes: int  # torch allocator, model + optimizer + data + activations
    process_peak_rss_bytes: int  # whole process: Python, torch libraries and the above
    import_rss_bytes: int  # the same process right after its imports, before training

    @property
    def rss_growth_bytes(self) -> int:
        """How much the process grew while training (torch's peak, malloc's retained free
        blocks, oneDNN/OpenMP workspaces and thread stacks)."""
        return self.process_peak_rss_bytes - self.import_rss_bytes


def _run_python(args: list[str], timeout: float) -> str:
    env = {**os.environ, "KINETO_LOG_LEVEL": "5"}  # kineto logs to stderr otherwise
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"measurement subprocess failed ({proc.returncode}):\n{tail}")
    return proc.stdout


def measure_training_peak(model: str, batch: int, num_classes: int = 10, image_size: int = 32,
                          steps: int = 2, timeout: float = 600) -> MeasuredPeak:
    """Run ``steps`` real training steps (Adam/amsgrad, as the device) in a fresh process."""
    out = _run_python(["-m", "device_profiles.memory_probe", "--model", model,
                       "--batch", str(batch), "--classes", str(num_classes),
                       "--size", str(image_size), "--steps", str(steps)], timeout)
    return MeasuredPeak(**json.loads(out.strip().splitlines()[-1]))


@dataclass(frozen=True)
class RuntimeFootprint:
    """Resident memory of fresh processes, in bytes."""

    python_bytes: int  # bare interpreter
    torch_bytes: int  # after ``import torch``
    device_stack_bytes: int  # after importing what a device process imports
    torch_version: str


# what a device process imports (gkt-edge), so measured RSS matches a device's
DEVICE_STACK = ("torch", "torchvision", "numpy", "zstandard", "paho.mqtt.client",
                "edge_runtime.device.agent")


def runtime_footprint(timeout: float = 300) -> RuntimeFootprint:
    """Peak RSS of three fresh interpreters (each a subprocess, a few seconds in all)."""
    def measure(imports: str) -> int:
        code = f"{imports}\nfrom device_profiles.memory_probe import peak_rss\nprint(peak_rss())"
        return int(_run_python(["-c", code], timeout))

    python = measure("pass")
    torch_rss = measure("import torch")
    stack = measure("import " + ", ".join(DEVICE_STACK))
    return RuntimeFootprint(python, torch_rss, stack, torch.__version__)
