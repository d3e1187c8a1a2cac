"""Accuracy and bytes of the digits federation per codec, over real MQTT, in one run.

Runs the in-process reference (raw fp32, bytes counted not sent) and then `gkt-hub
simulate --transport mqtt` once per codec with the same seed and split, and reports
test accuracy, upload bytes per sample and the change against fp32 over MQTT.
Usage: python bench/bench_federation.py [--rounds 10] [--codecs fp32,fp16,q8,q4] [--json PATH]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

from results_file import write_results  # noqa: E402

from edge_runtime.learning.data import DataConfig
from edge_runtime.learning.train import EdgeTrainConfig
from server_hub.simulation.inproc import FederationConfig, prepare, run_gkt
from server_hub.simulation.launch import simulate_mqtt
from server_hub.trainer import ServerTrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--codecs", default="fp32,fp16,q8,q4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench/results/federation.json")
    args = p.parse_args()
    base = FederationConfig(data=DataConfig("digits"), devices=args.devices, rounds=args.rounds,
                            seed=args.seed, edge=EdgeTrainConfig(batch_size=32),
                            server=ServerTrainConfig(epochs=3, batch_size=32))
    setup = prepare(base)
    n = sum(len(s) for s in setup.shards)
    rows = []
    t0 = time.perf_counter()
    ref = run_gkt(base, setup)
    rows.append({"transport": "inproc", "codec": "fp32 (counted)", **summary(ref, n, t0)})
    for codec in args.codecs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = FederationConfig(**{**base.__dict__, "state_dir": tmp})
            t0 = time.perf_counter()
            res = simulate_mqtt(cfg, codec, show_progress=False)
            rows.append({"transport": "mqtt", "codec": codec, **summary(res, n, t0),
                         "hub_bytes_received": res.broker_bytes["hub_received"]})
    fp32 = next((r for r in rows if r["codec"] == "fp32"), rows[0])
    print(f"\ndigits, {args.devices} devices, dirichlet:0.5, {args.rounds} rounds, "
          f"{n} training samples")
    print(f"{'transport':9} {'codec':15} {'final acc':>9} {'best acc':>9} {'up B/sample':>11} "
          f"{'vs fp32':>8} {'acc - fp32':>10} {'seconds':>8}")
    for r in rows:
        r["bytes_ratio_vs_fp32_mqtt"] = (fp32["upload_bytes_per_sample"]
                                         / r["upload_bytes_per_sample"])
        r["accuracy_delta_vs_fp32_mqtt"] = r["final_accuracy"] - fp32["final_accuracy"]
        print(f"{r['transport']:9} {r['codec']:15} {r['final_accuracy']:9.4f} "
              f"{r['best_accuracy']:9.4f} {r['upload_bytes_per_sample']:11.0f} "
              f"{r['bytes_ratio_vs_fp32_mqtt']:7.1f}x {r['accuracy_delta_vs_fp32_mqtt']:+10.4f} "
              f"{r['seconds']:8.1f}")
    out = {"machine": platform.machine(), "rounds": args.rounds, "devices": args.devices,
           "samples": n, "rows": rows}
    write_results(args.json, out)


def summary(res, n: int, t0: float) -> dict:
    accs = [r.test_accuracy for r in res.rounds]
    up = sum(r.upload_bytes for r in res.rounds)
    return {"final_accuracy": accs[-1], "best_accuracy": max(accs),
            "accuracy_by_round": accs, "upload_bytes": up,
            "upload_bytes_per_sample": up / (n * len(res.rounds)),
            "download_bytes": sum(r.download_bytes for r in res.rounds),
            "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    main()
