"""Hub throughput with K workers: server training samples/s of one server model trained by
K DDP processes (``train_server_ddp``, gloo on CPU) against one process (``train_server``),
on this machine, in one run.

Settings (each in fresh processes, asked in turn, launch round by launch round; medians):
  plain-T   one process, ``train_server``, T torch threads (today's single hub)
  ddp1-T    one DDP worker (world size 1): what the distributed code path costs by itself
  ddpK-T    K DDP workers with T threads each; the global batch stays ``--batch``
Also timed in the K-worker setting: one all-reduce of a gradient-sized fp32 tensor
(what DDP sends per step; it overlaps part of it with the backward pass).

Also reported: CPU time of all the setting's processes per sample, which other load on
a shared machine skews less than wall time.

Features are random post-ReLU 16xSxS maps (throughput does not depend on their values),
split evenly over the workers. Output: bench/results/workers.json; docs/scaling.md.

Usage: python bench/bench_workers.py [--model resnet55] [--samples 256] [--size 32]
       [--batch 64] [--epochs 3] [--launches 2] [--workers 2] [--json PATH]
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

import torch
import torch.multiprocessing as mp


def _run(rank: int, world: int, mode: str, threads: int, args: argparse.Namespace,
         out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from edge_runtime.learning.perf import keep_freed_memory, to_channels_last
    from server_hub.feature_bank import DeviceFeatures, FeatureBank
    from server_hub.models import build_server
    from server_hub.trainer import ServerTrainConfig, train_server
    from server_hub.workers.ddp_trainer import Shard, train_server_ddp
    from server_hub.workers.distributed import init_group

    torch.set_num_threads(threads)
    keep_freed_memory()
    torch.manual_seed(0)
    model = build_server(args.model, 10)
    to_channels_last(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    counts = [args.samples // world + (r < args.samples % world) for r in range(world)]
    n = counts[rank]
    g = torch.Generator().manual_seed(rank)
    shape = (16, args.size, args.size)
    feats = torch.relu(torch.randn(n, *shape, generator=g))
    labels = torch.randint(0, 10, (n,), generator=g)
    cfg = ServerTrainConfig(args.model, epochs=1, batch_size=args.batch, device="cpu")
    result: dict = {"mode": mode, "world": world, "threads": threads, "epoch_s": [],
                    "cpu_s": []}
    if mode == "plain":
        bank = FeatureBank()
        bank.add("d", DeviceFeatures(torch.arange(n), feats, torch.zeros(n, 10), labels))
        train_server(model, opt, bank, ["d"], cfg, g)  # warm-up
        for _ in range(args.epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            train_server(model, opt, bank, ["d"], cfg, g)
            result["epoch_s"].append(time.perf_counter() - t0)
            result["cpu_s"].append(time.process_time() - c0)
    else:
        init_group("gloo", f"file://{out}.pg", rank, world)
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)
        shard = Shard(torch.zeros(n, 2, dtype=torch.long), feats, torch.zeros(n, 10), labels)
        train_server_ddp(ddp, opt, shard, counts, shape, cfg, g)  # warm-up
        for _ in range(args.epochs):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            train_server_ddp(ddp, opt, shard, counts, shape, cfg, g)
            dist.barrier()
            result["epoch_s"].append(time.perf_counter() - t0)
            result["cpu_s"].append(time.process_time() - c0)
        nparams = sum(p.numel() for p in model.parameters())
        flat = torch.zeros(nparams)
        times = []
        for _ in range(10):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            times.append(time.perf_counter() - t0)
        result["allreduce_ms"] = 1000 * statistics.median(times)
        result["grad_bytes"] = 4 * nparams
        dist.destroy_process_group()
    result["steps_per_epoch"] = -(-args.samples // args.batch)
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def launch(mode: str, world: int, threads: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result.json"
        mp.spawn(_run, args=(world, mode, threads, args, out), nprocs=world, join=True)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
        # CPU time of all workers together (process time: every thread, gloo's included)
        ranks[0]["cpu_s"] = [sum(c) for c in zip(*(r["cpu_s"] for r in ranks))]
        return ranks[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet55")
    p.add_argument("--samples", type=int, default=256, help="features on all workers")
    p.add_argument("--size", type=int, default=32, help="feature map side (32 = CIFAR)")
    p.add_argument("--batch", type=int, default=64, help="global training batch")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per launch")
    p.add_argument("--launches", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default="bench/results/workers.json")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    k = args.workers
    settings = [("plain", 1, 1), ("plain", 1, cores), ("ddp", 1, cores),
                ("ddp", k, max(1, cores // k))]
    runs: dict[str, list[dict]] = {}
    load0 = os.getloadavg()[0]  # other work on the machine skews samples/s, not ratios much
    t0 = time.perf_counter()
    for i in range(args.launches):
        for mode, world, threads in settings:
            name = f"{mode}{world if mode == 'ddp' else ''}-{threads}"
            runs.setdefault(name, []).append(launch(mode, world, threads, args))
        print(f"launch round {i + 1}/{args.launches} done ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    table = {}
    for name, rs in runs.items():
        epoch = statistics.median([t for r in rs for t in r["epoch_s"]])
        cpu = statistics.median([t for r in rs for t in r["cpu_s"]])
        row = {"workers": rs[0]["world"], "threads_each": rs[0]["threads"],
               "epoch_s": round(epoch, 3), "samples_per_s": round(args.samples / epoch, 1),
               "cpu_ms_per_sample": round(1000 * cpu / args.samples, 2),
               "steps_per_epoch": rs[0]["steps_per_epoch"]}
        if "allreduce_ms" in rs[0]:
            ar = statistics.median([r["allreduce_ms"] for r in rs])
            row["allreduce_ms_per_step"] = round(ar, 2)
            row["allreduce_share_if_not_overlapped"] = round(
                ar / 1000 * row["steps_per_epoch"] / epoch, 3)
            row["grad_bytes_per_step"] = rs[0]["grad_bytes"]
        table[name] = row
        print(f"{name:>10}: {row['samples_per_s']:7.1f} samples/s, "
              f"{row['cpu_ms_per_sample']:.1f} CPU-ms/sample "
              f"({row['workers']} x {row['threads_each']} threads)"
              + (f", all-reduce {row['allreduce_ms_per_step']:.1f} ms/step"
                 if "allreduce_ms_per_step" in row else ""))
    base = table[f"plain-{cores}"]["samples_per_s"]
    result = {
        "what": "server training samples/s, one epoch (train_server vs train_server_ddp)",
        "machine": {"cores": cores, "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_avg_at_start": load0,
                    "load_avg_at_end": os.getloadavg()[0]},
        "config": vars(args),
        "settings": table,
        "speedup_vs_one_process_all_cores": {n: round(r["samples_per_s"] / base, 3)
                                             for n, r in table.items()},
        "note": "medians over launches x epochs; a shared machine: compare ratios in this run",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
