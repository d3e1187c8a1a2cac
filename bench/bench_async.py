"""Sync vs async GKT on a heterogeneous fleet, accuracy against wall-clock time, one run.

Four digits devices, the last one 5x slower in compute and link (``--device-speeds`` /
``--bandwidths``), all in this process (devices are throttled threads; evaluation is
deferred to snapshots, so it costs neither timeline anything). Sync runs ``--rounds``
rounds; async then runs for the same wall-clock time. Reported: each mode's final
accuracy, and the time each needed to reach the sync final accuracy minus one point.

Usage: python bench/bench_async.py [--rounds 15] [--device-speeds 1,1,1,5]
       [--bandwidths 2M,2M,2M,400K] [--json bench/results/async.json]
       [--plot docs/async-vs-sync.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from edge_runtime.learning.data import DataConfig
from edge_runtime.learning.train import EdgeTrainConfig
from server_hub.async_mode.rules import AsyncConfig
from server_hub.simulation.inproc import FederationConfig, prepare
from server_hub.simulation.speeds import build_fleet
from server_hub.simulation.throttled import run_gkt_async_fleet, run_gkt_sync_fleet
from server_hub.trainer import ServerTrainConfig


def time_to(records: list[dict], target: float) -> float | None:
    """First elapsed second at which test accuracy reached ``target``."""
    return next((r["elapsed"] for r in records if r["test_accuracy"] >= target), None)


def plot(runs: dict[str, list[dict]], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, style in (("sync", "o-"), ("async", "s-")):
        recs = runs[mode]
        ax.plot([0] + [r["elapsed"] for r in recs], [0.1] + [r["test_accuracy"] for r in recs],
                style, label=mode, markersize=4)
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"sync final - 1 pt ({target:.3f})")
    ax.set_xlabel("wall-clock seconds")
    ax.set_ylabel("test accuracy (extractor_k + server, mean over devices)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--device-speeds", default="1,1,1,5")
    p.add_argument("--bandwidths", default="2M,2M,2M,400K")
    p.add_argument("--edge-epochs", type=int, default=2)
    p.add_argument("--server-epochs", type=int, default=1)
    p.add_argument("--eval-seconds", type=float, default=0.0,
                   help="async evaluation period (0: the mean sync round time)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared by all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench/results/async.json")
    p.add_argument("--plot", default="docs/async-vs-sync.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = FederationConfig(data=DataConfig("digits"), devices=args.devices, rounds=args.rounds,
                           seed=args.seed, edge=EdgeTrainConfig(args.edge_epochs, 32),
                           server=ServerTrainConfig(epochs=args.server_epochs, batch_size=32,
                                                    device="cpu"))
    fleet = build_fleet(args.devices, args.device_speeds, None, args.bandwidths)
    setup = prepare(cfg)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    sync = run_gkt_sync_fleet(cfg, setup, fleet)
    budget = sync.rounds[-1].elapsed
    eval_s = args.eval_seconds or budget / args.rounds
    acfg = AsyncConfig(eval_seconds=eval_s, duration=budget)
    asyn = run_gkt_async_fleet(cfg, setup, fleet, acfg)
    runs = {"sync": [r.__dict__ for r in sync.rounds], "async": [r.__dict__ for r in asyn.rounds]}
    sync_final = runs["sync"][-1]["test_accuracy"]
    target = sync_final - 0.01
    t_sync, t_async = time_to(runs["sync"], target), time_to(runs["async"], target)
    summary = {
        "sync_final_accuracy": sync_final,
        "async_final_accuracy": runs["async"][-1]["test_accuracy"],
        "async_best_accuracy": max(r["test_accuracy"] for r in runs["async"]),
        "target_accuracy": target,
        "sync_seconds_to_target": t_sync,
        "async_seconds_to_target": t_async,
        "time_ratio_sync_over_async": (t_sync / t_async) if t_sync and t_async else None,
        "sync_seconds_total": budget,
        "async_updates": runs["async"][-1]["updates"],
        "sync_device_uploads": args.rounds * args.devices,
    }
    out = {
        "command": "python bench/bench_async.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_start": load0,
                    "load_avg_end": os.getloadavg()[0]},
        "seconds": round(time.perf_counter() - t0, 1),
        "settings": {"fleet": [s.__dict__ for s in fleet], "async": acfg.__dict__,
                     "edge_epochs": args.edge_epochs, "server_epochs": args.server_epochs},
        "summary": summary,
        "sync": sync.to_dict(),
        "async": asyn.to_dict(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    title = (f"GKT on digits, {args.devices} devices, speeds {args.device_speeds}, links "
             f"{args.bandwidths} B/s; E_c={args.edge_epochs}, E_s={args.server_epochs}")
    plot(runs, target, Path(args.plot), title)
    for mode in ("sync", "async"):
        print(f"{mode:>5}: " + "  ".join(f"{r['elapsed']:.0f}s:{r['test_accuracy']:.3f}"
                                        for r in runs[mode]))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
