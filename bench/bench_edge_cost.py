"""Edge cost of GKT (ResNet-8) against FedAvg (ResNet-56/110) on this CPU, before and after
the speed work, in one run.

For each model: parameters, forward multiply-adds per image (torch FlopCounterMode / 2),
and the time of one training step (``train_edge`` on one batch: forward, CE, backward,
Adam/amsgrad) "before" (NCHW, the old pooling, glibc's default allocator) and "after" (the
library's defaults: channels-last, GlobalAvgPool, kept heap memory; docs/performance.md),
and "after+bf16" (the opt-in ``precision="bf16"``: autocast to bfloat16, in the same worker
as "after"). Every model gets every setting: the FedAvg baselines are as tuned as the edge.
Achieved GFLOP/s counts a training step as 3 forward passes at 2 flops per multiply-add,
and is set against a 2048^3 fp32 matmul's GFLOP/s in the same process.

Each setting runs in its own worker process (bench/cpu_worker.py); the workers are asked
in turn, model by model, round by round, so load from other processes hits all alike.
Medians over all timed steps. Wall time is what users feel; CPU time (user + system of the
worker) is steadier on a shared machine and, with one thread, close to the work done.

Usage: python bench/bench_edge_cost.py [--batch 64] [--size 32] [--rounds 5] [--steps 2]
       [--threads 0,1] [--json PATH]      (threads: 0 = torch's default, one per core)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from cpu_worker import BASELINE, TUNED, TUNED_BF16, Worker, machine_info
from results_file import write_results  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

from edge_runtime.learning.models import EdgeResNet8, count_parameters
from server_hub.models import resnet56, resnet110

MODELS = {"resnet8": EdgeResNet8, "resnet56": resnet56, "resnet110": resnet110}
LABELS = {"resnet8": "resnet8 (GKT edge)", "resnet56": "resnet56 (FedAvg)",
          "resnet110": "resnet110 (FedAvg)"}
MATMUL_N = 2048


def forward_macs(model: torch.nn.Module, size: int) -> int:
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, size, size))
    return fc.get_total_flops() // 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--threads", default="0", help="comma list; 0 = torch's default")
    p.add_argument("--json", default="bench/results/edge_cost.json")
    args = p.parse_args()
    info = machine_info()
    static = {}
    for name, build in MODELS.items():
        model = build(10)
        static[name] = {"params": count_parameters(model),
                        "forward_macs_per_image": forward_macs(model, args.size)}
    workers = {}
    for threads in (int(t) for t in args.threads.split(",")):
        workers[("before", threads)] = Worker(threads, tuned_allocator=False)
        workers[("after", threads)] = Worker(threads)
        workers[("after+bf16", threads)] = workers[("after", threads)]  # same process settings
    settings = {"before": BASELINE, "after": TUNED, "after+bf16": TUNED_BF16}
    times: dict[tuple, dict[str, list[float]]] = {}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        for name in MODELS:
            for (setting, threads), w in workers.items():
                r = w.ask(op="train", model=name, batch=args.batch, size=args.size,
                          calls=args.steps, **settings[setting])
                acc = times.setdefault((setting, threads, name), {"wall": [], "cpu": []})
                acc["wall"] += r["wall"]
                acc["cpu"] += r["cpu"]
        for (setting, threads), w in workers.items():
            r = w.ask(op="matmul", n=MATMUL_N, calls=2)
            acc = times.setdefault((setting, threads, "matmul"), {"wall": [], "cpu": []})
            acc["wall"] += r["wall"]
            acc["cpu"] += r["cpu"]
        print(f"round {rnd + 1}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s)",
              flush=True)
    thread_counts = {k: w.info["threads"] for k, w in workers.items()}
    for w in set(workers.values()):
        w.close()

    rows, summary = [], []
    step_flops = {n: 3 * 2 * s["forward_macs_per_image"] * args.batch for n, s in static.items()}
    for (setting, threads) in workers:
        mm_gflops = 2 * MATMUL_N**3 / statistics.median(
            times[(setting, threads, "matmul")]["wall"]) / 1e9
        by_model = {}
        for name in MODELS:
            t = times[(setting, threads, name)]
            wall, cpu = statistics.median(t["wall"]), statistics.median(t["cpu"])
            by_model[name] = {
                "setting": setting, "threads": thread_counts[(setting, threads)],
                "model": LABELS[name], **static[name],
                "step_ms_median": wall * 1e3, "step_cpu_ms_median": cpu * 1e3,
                "achieved_gflops": step_flops[name] / wall / 1e9,
                "matmul_gflops": mm_gflops,
                "fraction_of_matmul": step_flops[name] / wall / 1e9 / mm_gflops,
                "step_ms_all": [x * 1e3 for x in t["wall"]]}
        edge = by_model["resnet8"]
        for r in by_model.values():
            r["macs_ratio"] = r["forward_macs_per_image"] / edge["forward_macs_per_image"]
            r["time_ratio"] = r["step_ms_median"] / edge["step_ms_median"]
            r["cpu_time_ratio"] = r["step_cpu_ms_median"] / edge["step_cpu_ms_median"]
            rows.append(r)
        summary.append({"setting": setting, "threads": edge["threads"],
                        "resnet8_step_ms": edge["step_ms_median"],
                        "resnet8_gflops": edge["achieved_gflops"], "matmul_gflops": mm_gflops,
                        **{f"{n}_{k}": by_model[n][k] for n in ("resnet56", "resnet110")
                           for k in ("macs_ratio", "time_ratio", "cpu_time_ratio")}})

    print(f"\nbatch {args.batch}, {args.size}x{args.size}, {info['cpu']} ({info['cores']} cores), "
          f"torch {torch.__version__}; load average {info['load_average']} at start, "
          f"{os.getloadavg()[0]:.1f} at end: a shared machine, numbers are noisy")
    print(f"{'setting':10} {'thr':>3} {'model':20} {'MMACs':>7} {'step ms':>8} {'cpu ms':>7} "
          f"{'GFLOP/s':>8} {'% mm':>5} {'MACs x':>7} {'time x':>7} {'cpu x':>6}")
    for r in rows:
        print(f"{r['setting']:10} {r['threads']:>3} {r['model']:20} "
              f"{r['forward_macs_per_image'] / 1e6:>7.2f} {r['step_ms_median']:>8.1f} "
              f"{r['step_cpu_ms_median']:>7.1f} {r['achieved_gflops']:>8.1f} "
              f"{100 * r['fraction_of_matmul']:>5.1f} {r['macs_ratio']:>7.2f} "
              f"{r['time_ratio']:>7.2f} {r['cpu_time_ratio']:>6.2f}")
    print(f"(matmul {MATMUL_N}^3 GFLOP/s per setting: "
          + ", ".join(f"{s['setting']}/{s['threads']}t {s['matmul_gflops']:.0f}" for s in summary)
          + ")")
    out = {"batch": args.batch, "size": args.size, "rounds": args.rounds, "steps": args.steps,
           "flops_convention": "training step = 3 x forward, 2 flops per multiply-add",
           **info, "load_average_end": round(os.getloadavg()[0], 2),
           "summary": summary, "rows": rows}
    write_results(args.json, out)


if __name__ == "__main__":
    main()
