"""onnxruntime vs PyTorch eager, and int8 vs fp32 onnxruntime, for the edge and composed models.

Latency of one forward pass (median over runs; the candidates are timed interleaved, run
by run, so load from other processes hits them alike) at batch 1 and 64, at 8x8 (digits)
and 32x32 (CIFAR, the deployment size). Weights come from a checkpoint where one is given
and matches the size, random (seeded) otherwise: latency does not depend on them. int8 is
static QDQ with uint8 activations, calibrated on real digits training images at that size.
PyTorch and onnxruntime each get --threads intra-op threads (default 1).

Usage: python bench/bench_onnx.py [--checkpoint DIR --edge-state DIR] [--runs 30]
       [--threads 1] [--json bench/results/onnx.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime as ort
import torch

from edge_runtime.learning.data import DataConfig
from edge_runtime.learning.models import EdgeResNet8, FeatureExtractor
from export.graphs import EdgeLogits, GraphSpec, composed_spec, edge_spec, load_edge_state
from export.onnx_export import ExportOptions, export_graph
from export.pipeline import resolve_checkpoint
from export.quantize import QuantConfig, quantize_int8
from export.runtime import make_session, run
from export.samples import load_images
from server_hub.models import FullResNet, build_server


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def random_specs(size: int) -> list[GraphSpec]:
    torch.manual_seed(0)
    shape = (3, size, size)
    return [
        GraphSpec("edge", "edge", EdgeLogits(EdgeResNet8(10)).eval(), "image", "logits", shape,
                  None, None),
        GraphSpec("composed", "composed",
                  FullResNet(FeatureExtractor(), build_server("resnet55", 10)).eval(), "image",
                  "logits", shape, None, None),
    ]


def checkpoint_specs(checkpoint: str, edge_state: str | None) -> list[GraphSpec]:
    ckpt = resolve_checkpoint(Path(checkpoint))
    device = sorted(ckpt.extractors)[0]
    specs = [composed_spec(ckpt, device)]
    if edge_state:
        specs.insert(0, edge_spec(load_edge_state(Path(edge_state)), ckpt.meta))
    for s in specs:
        s.name = s.kind
    return specs


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int,
                        warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per candidate, each run calling every candidate once in turn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def candidates(module: torch.nn.Module, s32: ort.InferenceSession, s8: ort.InferenceSession,
               x: torch.Tensor) -> dict[str, Callable[[], object]]:
    xn = x.numpy()

    def eager():
        with torch.inference_mode():
            return module(x)

    return {"torch_eager": eager, "onnx_fp32": lambda: run(s32, xn),
            "onnx_int8": lambda: run(s8, xn)}


def bench_size(size: int, specs: list[GraphSpec], batches: list[int], runs: int, threads: int,
               tmp: Path) -> list[dict]:
    data = DataConfig("digits", image_size=size, augment=False)
    test_x, _ = load_images(data, train=False)
    calib, _ = load_images(data, train=True, limit=256)
    rows = []
    for spec in specs:
        fp32 = tmp / f"{spec.name}_{size}.onnx"
        onnx.save(export_graph(spec, test_x[:2], ExportOptions()), str(fp32))
        int8 = quantize_int8(fp32, calib.numpy(), QuantConfig(calibration_samples=256))
        s32 = make_session(fp32, threads)
        s8 = make_session(int8.SerializeToString(), threads)
        for b in batches:
            x = test_x.repeat(-(-b // len(test_x)), 1, 1, 1)[:b].contiguous()
            ms = interleaved_medians(candidates(spec.module, s32, s8, x),
                                     runs if b == 1 else max(5, runs // 3))
            row = {"size": size, "model": spec.name, "batch": b,
                   "weights": "checkpoint" if spec.round is not None else "random",
                   "median_ms": {k: round(v, 4) for k, v in ms.items()},
                   "onnx_speedup_vs_torch": round(ms["torch_eager"] / ms["onnx_fp32"], 2),
                   "int8_speedup_vs_fp32": round(ms["onnx_fp32"] / ms["onnx_int8"], 2)}
            rows.append(row)
            print(f"{size:>4} {spec.name:9} {b:>5} {ms['torch_eager']:>10.3f} "
                  f"{ms['onnx_fp32']:>10.3f} {ms['onnx_int8']:>10.3f} "
                  f"{row['onnx_speedup_vs_torch']:>11.2f}x {row['int8_speedup_vs_fp32']:>11.2f}x",
                  flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="hub checkpoint for real weights at its input size")
    p.add_argument("--edge-state", help="a device state dir: its edge model (with --checkpoint)")
    p.add_argument("--sizes", default="8,32")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--runs", type=int, default=60, help="timed runs at batch 1 (a third above)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="bench/results/onnx.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    ckpt_size = None
    if args.checkpoint:
        ckpt_size = int(resolve_checkpoint(Path(args.checkpoint)).meta["image_size"])
    load0 = os.getloadavg()
    print(f"{args.threads} thread(s) for torch and onnxruntime; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {os.cpu_count()} cores, load {load0[0]:.1f}")
    print(f"{'size':>4} {'model':9} {'batch':>5} {'torch ms':>10} {'onnx ms':>10} "
          f"{'int8 ms':>10} {'onnx speedup':>12} {'int8 speedup':>12}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gkt-bench-onnx-") as tmp:
        for size in sizes:
            specs = random_specs(size)
            if size == ckpt_size:
                real = {s.name: s for s in checkpoint_specs(args.checkpoint, args.edge_state)}
                specs = [real.get(s.name, s) for s in specs]
            rows += bench_size(size, specs, batches, args.runs, args.threads, Path(tmp))
    result = {
        "threads": args.threads, "runs_batch1": args.runs, "torch": torch.__version__,
        "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "load_average_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "checkpoint": args.checkpoint, "rows": rows,
        "batch1_onnx_speedup_min": min(r["onnx_speedup_vs_torch"] for r in rows
                                       if r["batch"] == 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
