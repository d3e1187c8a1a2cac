"""Measure training memory in a fresh process: ``python -m device_profiles.memory_probe``.

Prints one JSON line (see ``memory.MeasuredPeak``). A fresh process makes the RSS figures
mean what they say. After the imports, ``steps`` real training steps run twice: first
plainly (the process's peak RSS), then under torch.profiler (torch's allocator peak; the
profiler's own buffers would inflate the RSS, hence the first run).
Only the standard library is imported at module level, so ``peak_rss`` can be used to
measure bare imports too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys


def peak_rss() -> int:
    """Peak RSS of this process in bytes. Linux: VmHWM, because ru_maxrss starts from the
    parent's peak when the parent was larger at fork time."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet8")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from device_profiles.memory import DEVICE_STACK, allocator_peak
    from device_profiles.model_zoo import get_model
    from edge_runtime.learning.train import make_optimizer

    for name in DEVICE_STACK:  # a device process's imports, so the RSS matches one
        importlib.import_module(name)
    entry = get_model(args.model)
    import_rss = peak_rss()

    def train() -> None:
        torch.manual_seed(0)
        model = entry.build(args.classes).train()
        opt = make_optimizer(model, 1e-3, 1e-4)
        x = torch.randn(args.batch, entry.input_channels, args.size, args.size)
        y = torch.randint(0, args.classes, (args.batch,))
        for _ in range(args.steps):
            out = model(x)
            loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    train()
    process_peak = peak_rss()
    peak = allocator_peak(train)
    print(json.dumps({"model": args.model, "batch": args.batch, "steps": args.steps,
                      "allocator_peak_bytes": peak, "process_peak_rss_bytes": process_peak,
                      "import_rss_bytes": import_rss}))


if __name__ == "__main__":
    main()
