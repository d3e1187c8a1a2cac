"""The hub's server-model training throughput on a CUDA GPU: samples/s of ``server_step``
(the one training step the single hub, the workers and async mode share), with and without
bf16 autocast (``ServerTrainConfig.cuda_amp``) and channels-last, at the hub's batch sizes.
Also eval-mode logits (``server_logits``), fp32 and bf16.

Features are random post-ReLU 16x32x32 maps already on the device (throughput does not
depend on their values), so this is the model's speed, not the loader's; each step reads
its loss back to the host, as ``train_server`` does. Settings are asked in turn, repeat by
repeat; medians over repeats.

Usage: python bench/bench_hub_gpu.py [--model resnet55] [--batches 64,256] [--steps 60]
       [--repeats 3] [--device cuda] [--json bench/results/hub_gpu.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from results_file import write_results  # noqa: E402

from edge_runtime.learning.models import FEATURE_CHANNELS  # noqa: E402
from edge_runtime.learning.perf import to_channels_last  # noqa: E402
from server_hub.models import build_server  # noqa: E402
from server_hub.trainer import ServerTrainConfig, server_logits, server_step  # noqa: E402

SETTINGS = {  # name: (cuda_amp, channels_last)
    "fp32 nchw": (False, False),
    "fp32 channels-last (hub default)": (False, True),
    "bf16 nchw": (True, False),
    "bf16 channels-last": (True, True),
}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_rate(cfg: ServerTrainConfig, dev: torch.device, steps: int, warmup: int) -> float:
    """samples/s of ``steps`` server steps of ``cfg.batch_size`` after ``warmup`` (a fresh
    model per call)."""
    batch = cfg.batch_size
    torch.manual_seed(0)
    model = build_server(cfg.model, 10).to(dev)
    if cfg.channels_last:
        to_channels_last(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    h = torch.relu(torch.randn(batch, FEATURE_CHANNELS, 32, 32, device=dev))
    y = torch.randint(0, 10, (batch,), device=dev)
    z = torch.randn(batch, 10, device=dev)
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            t0 = time.perf_counter()
        loss, _ = server_step(model, opt, cfg, h, y, z)
        float(loss)  # train_server reads every step's loss (non-finite check)
    sync(dev)
    return batch * steps / (time.perf_counter() - t0)


def logits_rate(cfg: ServerTrainConfig, dev: torch.device, n: int, precision: str) -> float:
    model = build_server(cfg.model, 10).to(dev)
    feats = torch.relu(torch.randn(n, FEATURE_CHANNELS, 32, 32))
    server_logits(model, feats[:256], precision=precision)  # warm-up (cudnn autotune)
    sync(dev)
    t0 = time.perf_counter()
    server_logits(model, feats, precision=precision)
    sync(dev)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet55")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--logits-samples", type=int, default=8192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=str(HERE / "results" / "hub_gpu.json"))
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train_server sets it
        name = torch.cuda.get_device_name(dev)
    else:
        name = "cpu (smoke run; this benchmark is for a CUDA hub)"
    base = ServerTrainConfig(model=args.model, device=args.device)
    batches = [int(b) for b in args.batches.split(",")]
    rates: dict[tuple[int, str], list[float]] = {}
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for batch in batches:
            for setting, (amp, cl) in SETTINGS.items():
                cfg = replace(base, cuda_amp=amp, channels_last=cl, batch_size=batch)
                r = train_rate(cfg, dev, args.steps, args.warmup)
                rates.setdefault((batch, setting), []).append(r)
        print(f"repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    rows = []
    for (batch, setting), rs in rates.items():
        rows.append({"job": "train", "model": args.model, "batch": batch, "setting": setting,
                     "samples_per_s": statistics.median(rs), "repeats": rs})
    for precision in ("fp32", "bf16"):
        rows.append({"job": "logits", "model": args.model, "batch": 256, "setting": precision,
                     "samples_per_s": logits_rate(base, dev, args.logits_samples, precision)})
    ref = {r["batch"]: r["samples_per_s"] for r in rows
           if r["job"] == "train" and r["setting"] == "fp32 nchw"}
    print(f"\n{name}, torch {torch.__version__}; {args.model}, median of {args.repeats}")
    print(f"{'job':6} {'batch':>5} {'setting':34} {'samples/s':>10} {'x fp32 nchw':>12}")
    for r in rows:
        x = r["samples_per_s"] / ref[r["batch"]] if r["job"] == "train" else float("nan")
        r["speedup_over_fp32_nchw"] = round(x, 3) if r["job"] == "train" else None
        print(f"{r['job']:6} {r['batch']:>5} {r['setting']:34} {r['samples_per_s']:>10.0f} "
              f"{x:>12.2f}")
    write_results(args.json, {"bench": "hub_gpu", "device": name, "torch": torch.__version__,
                              "steps": args.steps, "warmup": args.warmup, "rows": rows})


if __name__ == "__main__":
    main()
