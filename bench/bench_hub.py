"""Hub throughput on this machine's CPU: samples/s of the server model's training
(``train_server``, one epoch over a feature bank) and of its logits (``server_logits``),
before and after the speed work, in one run.

"before": NCHW and glibc's default allocator, as the code was; "after": the library's
defaults (channels-last batches and model, kept heap memory; docs/performance.md);
"after+bf16": also bf16 autocast (ServerTrainConfig.cpu_precision, server_logits precision). The
features are random post-ReLU 16x32x32 maps (throughput does not depend on their values).
Each setting runs in its own worker process (bench/cpu_worker.py), asked in turn, round by
round; medians over rounds. With CUDA the trainer also uses bf16 autocast; this benchmark
measures the CPU only.

Usage: python bench/bench_hub.py [--models resnet55] [--samples 256] [--batch 64]
       [--logits-batch 256] [--rounds 3] [--threads 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from cpu_worker import BASELINE, TUNED, Worker, machine_info
from results_file import write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet55", help="comma list: resnet55,resnet109")
    p.add_argument("--samples", type=int, default=256, help="features in the bank")
    p.add_argument("--batch", type=int, default=64, help="training batch")
    p.add_argument("--logits-batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0 = torch's default (all cores)")
    p.add_argument("--json", default="bench/results/hub.json")
    args = p.parse_args()
    info = machine_info()
    workers = {"before": Worker(args.threads, tuned_allocator=False),
               "after": Worker(args.threads)}
    workers["after+bf16"] = workers["after"]  # the same process settings
    settings = {"before": {"channels_last": BASELINE["channels_last"]},
                "after": {"channels_last": TUNED["channels_last"]},
                "after+bf16": {"channels_last": TUNED["channels_last"], "precision": "bf16"}}
    jobs = {"train": {"op": "hub_train", "batch": args.batch},
            "logits": {"op": "hub_logits", "batch": args.logits_batch}}
    acc: dict[tuple, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        for model in args.models.split(","):
            for job, req in jobs.items():
                for setting, w in workers.items():
                    r = w.ask(**req, **settings[setting], model=model, samples=args.samples)
                    a = acc.setdefault((model, job, setting), {"wall": [], "cpu": []})
                    a["wall"] += r["wall"]
                    a["cpu"] += r["cpu"]
        print(f"round {rnd + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    threads = workers["after"].info["threads"]
    for w in set(workers.values()):
        w.close()

    rows = []
    for (model, job, setting), a in acc.items():
        wall, cpu = statistics.median(a["wall"]), statistics.median(a["cpu"])
        rows.append({"model": model, "job": job, "setting": setting, "threads": threads,
                     "batch": jobs[job]["batch"], "samples_per_s": args.samples / wall,
                     "cpu_samples_per_s": args.samples / cpu})
    by = {(r["model"], r["job"], r["setting"]): r for r in rows}
    for r in rows:
        before = by[(r["model"], r["job"], "before")]
        r["speedup"] = r["samples_per_s"] / before["samples_per_s"]
        r["cpu_speedup"] = r["cpu_samples_per_s"] / before["cpu_samples_per_s"]

    print(f"\n{info['cpu']} ({info['cores']} cores, {threads} threads), torch {info['torch']}; "
          f"load average {info['load_average']} at start, {os.getloadavg()[0]:.1f} at end: "
          f"a shared machine, numbers are noisy")
    print(f"{'model':10} {'job':7} {'setting':10} {'batch':>5} {'samples/s':>10} {'per cpu-s':>10} "
          f"{'x':>5} {'cpu x':>6}")
    for r in rows:
        print(f"{r['model']:10} {r['job']:7} {r['setting']:10} {r['batch']:>5} "
              f"{r['samples_per_s']:>10.1f} {r['cpu_samples_per_s']:>10.1f} {r['speedup']:>5.2f} "
              f"{r['cpu_speedup']:>6.2f}")
    out = {**info, "load_average_end": round(os.getloadavg()[0], 2), "samples": args.samples,
           "rounds": args.rounds, "device": "cpu", "rows": rows}
    write_results(args.json, out)


if __name__ == "__main__":
    main()
