"""What makes the edge model fast on this CPU: each speed setting on its own, in one run.

ResNet-8 training steps (``train_edge`` on one batch) and feature extraction (one batch of
``extract_features``) under: the code before the speed work; channels-last; glibc keeping
freed memory; the GlobalAvgPool; one thread per core; 1 inter-op thread; bf16 autocast;
torch.compile (its compile time too, and the steps it needs to pay off); batch sizes;
onnxruntime extraction (and the export it needs every round); and one epoch of the
augmented CIFAR-10 loader, torchvision's per-image DataLoader against in-memory batches.
Every process-wide setting gets its own worker process (bench/cpu_worker.py); the workers
are asked in turn, variant by variant, round by round, so load from other processes hits
all alike. Medians over all timed calls; "cpu" is the
worker's CPU time (user + system), steadier than wall time on a shared machine.

Usage: python bench/bench_edge_tuning.py [--rounds 5] [--calls 2] [--threads 1]
       [--no-compile] [--shard 6250] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from cpu_worker import BASELINE, TUNED, TUNED_BF16, Worker, machine_info
from results_file import write_results  # noqa: E402

ADAPTIVE_CL = {"channels_last": True, "pool": "adaptive"}
ADAPTIVE_NCHW = {"channels_last": False, "pool": "adaptive"}

# name -> (worker, request). Workers: "base" (glibc's default allocator), "tuned",
# "cores" (torch's default threads: one per core), "interop1" (1 inter-op thread).
TRAIN = {
    "before: NCHW, AdaptiveAvgPool, default allocator": ("base", BASELINE),
    "+ channels_last": ("base", ADAPTIVE_CL),
    "+ kept freed memory (glibc)": ("tuned", ADAPTIVE_CL),
    "+ GlobalAvgPool = after (library default)": ("tuned", TUNED),
    "kept freed memory only (NCHW)": ("tuned", ADAPTIVE_NCHW),
    "after, torch's default threads (one per core)": ("cores", TUNED),
    "after, 1 inter-op thread": ("interop1", TUNED),
    "after + bf16 autocast (precision=bf16)": ("tuned", TUNED_BF16),
}
EXTRACT = {  # name -> (worker, backend, precision)
    "before: eager NCHW, default allocator": ("base", "eager", "fp32"),
    "eager NCHW, kept freed memory": ("tuned", "eager", "fp32"),
    "after: BN folded + channels_last (default)": ("tuned", "folded", "fp32"),
    "BN folded + channels_last + bf16 autocast": ("tuned", "folded", "bf16"),
    "onnxruntime session run": ("tuned", "onnxruntime", "fp32"),
}
LOAD = {
    "before: DataLoader, PIL crop/flip per image": "torchvision",
    "after: uint8 in memory, torch crop/flip per batch (default)": "batched",
}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=2, help="timed calls per variant per round")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (0 = torch's default); 1 is steadiest when shared")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", default="16,32,64,128", help="batch sizes to compare")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--load-samples", type=int, default=640,
                   help="images per timed loader epoch")
    p.add_argument("--shard", type=int, default=6250,
                   help="samples per device for the per-round figures (CIFAR-10 / 8)")
    p.add_argument("--json", default="bench/results/edge_tuning.json")
    args = p.parse_args()
    info = machine_info()
    workers = {"base": Worker(args.threads, tuned_allocator=False),
               "tuned": Worker(args.threads), "cores": Worker(0),
               "interop1": Worker(args.threads, interop=1)}
    plan = [("train", name, w, {"op": "train", "model": "resnet8", "batch": args.batch, **req})
            for name, (w, req) in TRAIN.items()]
    if not args.no_compile:
        plan.append(("train", "after + torch.compile", "tuned",
                     {"op": "train", "model": "resnet8", "batch": args.batch, "compile": True,
                      **TUNED}))
    plan += [("batch", f"after, batch {b}", "tuned",
              {"op": "train", "model": "resnet8", "batch": b, **TUNED})
             for b in (int(x) for x in args.batches.split(",")) if b != args.batch]
    plan += [("extract", name, w, {"op": "extract", "batch": args.batch, "mode": mode,
                                   "precision": precision})
             for name, (w, mode, precision) in EXTRACT.items()]
    plan += [("load", name, "tuned", {"op": "load", "batch": args.batch, "mode": mode,
                                      "samples": args.load_samples})
             for name, mode in LOAD.items()]
    plan.append(("export", "onnxruntime export + session (once per round)", "tuned",
                 {"op": "ort_export", "batch": args.batch}))
    results = {name: {"wall": [], "cpu": [], "setup_s": 0.0} for _, name, _, _ in plan}
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        for _, name, w, req in plan:
            calls = 1 if req["op"] == "ort_export" else args.calls
            r = workers[w].ask(**req, calls=calls)
            acc = results[name]
            acc["wall"] += r["wall"]
            acc["cpu"] += r["cpu"]
            acc["setup_s"] += r["setup_s"]
        print(f"round {rnd + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    threads = {k: w.info["threads"] for k, w in workers.items()}
    for w in workers.values():
        w.close()

    rows = []
    for kind, name, w, req in plan:
        acc, batch = results[name], req["batch"]
        per_call = req.get("samples", batch)  # a loader call is an epoch of `samples`
        rows.append({"kind": kind, "variant": name, "threads": threads[w], "batch": batch,
                     "ms_median": med(acc["wall"]) * 1e3, "cpu_ms_median": med(acc["cpu"]) * 1e3,
                     "us_per_sample": med(acc["wall"]) * 1e6 / per_call,
                     "cpu_us_per_sample": med(acc["cpu"]) * 1e6 / per_call,
                     "setup_s": acc["setup_s"]})
    by = {r["variant"]: r for r in rows}
    # speed-ups against: the old code (training, extraction); the default at --batch (batches)
    refs = {"train": next(iter(TRAIN)), "extract": next(iter(EXTRACT)),
            "batch": "+ GlobalAvgPool = after (library default)", "load": next(iter(LOAD))}
    for r in rows:
        if r["kind"] in refs:
            base = by[refs[r["kind"]]]
            r["speedup"] = base["us_per_sample"] / r["us_per_sample"]
            r["cpu_speedup"] = base["cpu_us_per_sample"] / r["cpu_us_per_sample"]

    after = by["+ GlobalAvgPool = after (library default)"]
    steps = -(-args.shard // args.batch)  # one local epoch
    round_figures = {"shard_samples": args.shard, "steps_per_epoch": steps,
                     "train_epoch_s_after": steps * after["ms_median"] / 1e3}
    if not args.no_compile:
        comp = by["after + torch.compile"]
        gain_ms = after["ms_median"] - comp["ms_median"]
        round_figures |= {
            "compile_s": comp["setup_s"], "compiled_step_gain_ms": gain_ms,
            "compile_break_even_steps": comp["setup_s"] * 1e3 / gain_ms if gain_ms > 0 else None,
            "compile_net_s_first_epoch": comp["setup_s"] - steps * gain_ms / 1e3}
    fold = by["after: BN folded + channels_last (default)"]
    ort, export = by["onnxruntime session run"], by["onnxruntime export + session (once per round)"]
    gain_ms = fold["ms_median"] - ort["ms_median"]
    round_figures |= {
        "extract_epoch_s_folded": steps * fold["ms_median"] / 1e3,
        "extract_epoch_s_onnxruntime": (steps * ort["ms_median"] + export["ms_median"]) / 1e3,
        "onnxruntime_break_even_batches": export["ms_median"] / gain_ms if gain_ms > 0 else None}
    old_load, new_load = (by[name] for name in LOAD)
    round_figures |= {  # the loader's share of an epoch (load + train steps), before and after
        "load_ms_per_batch_before": old_load["us_per_sample"] * args.batch / 1e3,
        "load_ms_per_batch_after": new_load["us_per_sample"] * args.batch / 1e3}

    print(f"\nResNet-8, {info['cpu']} ({info['cores']} cores), torch {info['torch']}; load average "
          f"{info['load_average']} at start, {os.getloadavg()[0]:.1f} at end: a shared machine, "
          f"numbers are noisy")
    print(f"{'kind':8} {'variant':58} {'thr':>3} {'batch':>5} {'ms':>8} {'cpu ms':>8} "
          f"{'us/img':>7} {'x':>5} {'cpu x':>5} {'setup s':>7}")
    for r in rows:
        print(f"{r['kind']:8} {r['variant']:58} {r['threads']:>3} {r['batch']:>5} "
              f"{r['ms_median']:>8.1f} {r['cpu_ms_median']:>8.1f} {r['us_per_sample']:>7.0f} "
              f"{r.get('speedup', float('nan')):>5.2f} {r.get('cpu_speedup', float('nan')):>5.2f} "
              f"{r['setup_s']:>7.2f}")
    print("per round on a shard of", args.shard, "samples:",
          ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in round_figures.items()))
    out = {**info, "load_average_end": round(os.getloadavg()[0], 2), "rounds": args.rounds,
           "calls": args.calls, "per_round": round_figures, "rows": rows}
    write_results(args.json, out)


if __name__ == "__main__":
    main()
