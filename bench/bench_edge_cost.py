"""Edge cost of GKT (ResNet-8) against FedAvg (ResNet-56/110) on this CPU, in one run.

Parameters, forward multiply-adds per image (torch FlopCounterMode / 2), and the measured
time of one training step (forward + backward + Adam) per batch; medians over steps.
Usage: python bench/bench_edge_cost.py [--batch 64] [--size 32] [--steps 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from edge_runtime.models import EdgeResNet8, count_parameters
from server_hub.models import resnet56, resnet110

MODELS = {"resnet8 (GKT edge)": EdgeResNet8, "resnet56 (FedAvg)": resnet56,
          "resnet110 (FedAvg)": resnet110}


def forward_macs(model: torch.nn.Module, size: int) -> int:
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, size, size))
    return fc.get_total_flops() // 2


def step_times(model: torch.nn.Module, batch: int, size: int, steps: int, warmup: int = 2):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default="bench/results/edge_cost.json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, build in MODELS.items():
        model = build(10)
        times = step_times(model, args.batch, args.size, args.steps)
        macs = forward_macs(model, args.size)
        med = statistics.median(times)
        rows.append({
            "model": name,
            "params": count_parameters(model),
            "forward_macs_per_image": macs,
            "step_seconds_median": med,
            "step_seconds_all": times,
            "achieved_gflops": 3 * 2 * macs * args.batch / med / 1e9,  # train ~ 3x forward
        })
    base = rows[0]
    print(f"batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'model':22} {'params':>10} {'MMACs/img':>10} {'step ms':>9} {'GFLOP/s':>8} "
          f"{'params x':>9} {'MACs x':>7} {'time x':>7}")
    for r in rows:
        r["params_ratio"] = r["params"] / base["params"]
        r["macs_ratio"] = r["forward_macs_per_image"] / base["forward_macs_per_image"]
        r["time_ratio"] = r["step_seconds_median"] / base["step_seconds_median"]
        print(f"{r['model']:22} {r['params']:>10,} {r['forward_macs_per_image'] / 1e6:>10.2f} "
              f"{r['step_seconds_median'] * 1e3:>9.1f} {r['achieved_gflops']:>8.1f} "
              f"{r['params_ratio']:>9.1f} {r['macs_ratio']:>7.2f} {r['time_ratio']:>7.2f}")
    out = {"batch": args.batch, "size": args.size, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "machine": platform.machine(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
