"""Load: N light devices upload at once through a real Mosquitto to a real hub.

The hub runs in its own process (bench/load_hub.py, so its memory is its own) and samples
its anonymous resident memory (RssAnon: what features held in RAM would grow) every 10 ms,
plus its peak resident set (VmHWM) and tracemalloc's peak (Python and numpy allocations:
decoded chunks, the in-RAM bank), and times the disk steps of its receive path. Each
configuration runs with the feature bank in RAM and spilled to the state directory,
interleaved (the order alternates), ``--repeats`` times, so ratios are read from one
run (medians in "medians").

Sync: "full" runs are whole rounds (collect, train the server, logits back to every
device, evaluate). Server training on a 2-core CPU costs minutes per thousand 16x32x32
samples, so the larger "collect" runs stop the hub once every upload is stored: that phase
is what grows with devices x samples (training gathers one batch at a time). Async
(``--modes async``): every device uploads once to the AsyncHubService, which trains while
they arrive; after the last merge it takes ``--async-steps`` steps over the whole bank.

    .venv/bin/python bench/bench_load.py            # writes bench/results/load.json
    .venv/bin/python bench/bench_load.py --modes async --full-samples --collect-samples 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from load_hub import hub_main  # noqa: E402
from load_senders import LoadConfig, run_senders  # noqa: E402


def run_one(url: str, cfg: LoadConfig, mode: str, bank: str, full: bool,
            args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="gkt-load-") as tmp:
        out = Path(tmp) / "hub.json"
        cmd = [sys.executable, __file__, "--role", "hub", "--url", url, "--state",
               str(Path(tmp) / "hub"), "--out", str(out), "--bank", bank,
               "--devices", str(cfg.devices), "--size", str(cfg.size),
               "--max-payload", str(cfg.max_payload), "--threads", str(args.threads),
               "--server-epochs", str(args.server_epochs), "--mode", mode,
               "--async-steps", str(args.async_steps)]
        cmd += [] if full or mode == "async" else ["--collect-only"]
        hub = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        t0 = time.perf_counter()
        results = run_senders(url, cfg, timeout=900, wait_logits=full)
        senders_s = time.perf_counter() - t0
        if hub.wait(timeout=900) != 0:
            raise RuntimeError(f"hub process exited with {hub.returncode}")
        stats = json.loads(out.read_text())
    sent = sum(len(r.sent_ids) for r in results)
    once = all(set(r.logits_per_id) == set(r.sent_ids) and set(r.logits_per_id.values())
               == {1} for r in results)
    return {
        "mode": mode, "run": "full" if full else "collect", "bank": bank,
        "devices": cfg.devices,
        "samples_per_device": cfg.samples,
        "samples_sent": sent, "feature_shape": [16, cfg.size, cfg.size], "codec": cfg.codec,
        "errors": [r.error for r in results if r.error],
        "every_sample_in_bank_once": stats["samples_in_bank"] == sent,
        "every_logit_back_once": once if full else None,
        "upload_bytes": sum(r.bytes_up for r in results),
        "upload_seconds_max": round(max(r.upload_s for r in results), 3),
        "upload_seconds_median": round(sorted(r.upload_s for r in results)[len(results) // 2], 3),
        "senders_wall_seconds": round(senders_s, 3),
        "hub": stats,
    }


def summary(r: dict) -> str:
    h = r["hub"]
    collect = h["phases"].get("collect", {})
    return (f"{r['mode']} {r['run']:>7} {r['bank']:>6} bank: {r['devices']} devices x "
            f"{r['samples_per_device']} samples, {r['upload_bytes'] / 1e6:.1f} MB up in "
            f"{r['upload_seconds_max']:.1f}s (all at once); hub RssAnon "
            f"+{collect.get('rss_anon_growth_mb')} MB collecting, "
            f"+{h['rss_anon_growth_mb']} MB overall (peak {h['rss_anon_peak_mb']} MB), "
            f"tracemalloc peak {h['tracemalloc_peak_mb']} MB; all samples once: "
            f"{r['every_sample_in_bank_once']}, logits once: {r['every_logit_back_once']}; "
            f"receive path {h['receive_path_seconds']}")


def medians(runs: list[dict]) -> list[dict]:
    """Per configuration and bank: medians over the repeats, and disk / memory ratios."""
    def key(r: dict) -> tuple:
        return r["mode"], r["run"], r["devices"], r["samples_per_device"]

    fields = {
        "upload_seconds_max": lambda r: r["upload_seconds_max"],
        "upload_seconds_median": lambda r: r["upload_seconds_median"],
        "collect_rss_anon_growth_mb": lambda r: r["hub"]["phases"].get("collect", {}).get(
            "rss_anon_growth_mb"),
        "rss_anon_growth_mb": lambda r: r["hub"]["rss_anon_growth_mb"],
        "tracemalloc_peak_mb": lambda r: r["hub"]["tracemalloc_peak_mb"],
        **{f"hub_{k}": (lambda r, k=k: r["hub"]["receive_path_seconds"].get(k))
           for k in ("receive_s", "journal_record_s", "journal_fsync_s", "bank_add_s")},
    }
    out = []
    for k in sorted({key(r) for r in runs}):
        row: dict = dict(zip(("mode", "run", "devices", "samples_per_device"), k))
        for bank in ("memory", "disk"):
            rs = [r for r in runs if key(r) == k and r["bank"] == bank]
            if rs:
                row[bank] = {"repeats": len(rs), **{
                    f: round(statistics.median(v), 3) if (v := [g(r) for r in rs
                                                                if g(r) is not None]) else None
                    for f, g in fields.items()}}
        if "memory" in row and "disk" in row:
            row["disk_over_memory"] = {f: round(d / m, 2) for f in fields
                                       if (m := row["memory"][f]) and (d := row["disk"][f])
                                       is not None}
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--role", choices=("bench", "hub"), default="bench")
    p.add_argument("--devices", type=int, default=32)
    p.add_argument("--full-samples", type=int, nargs="*", default=[8],
                   help="samples per device of whole-round runs (one per value and bank)")
    p.add_argument("--collect-samples", type=int, nargs="*", default=[32, 128],
                   help="samples per device of collect-phase runs")
    p.add_argument("--size", type=int, default=32, help="feature map side (32: CIFAR-size)")
    p.add_argument("--codec", default="q8")
    p.add_argument("--max-payload", type=int, default=256 * 1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--server-epochs", type=int, default=1)
    p.add_argument("--banks", nargs="+", default=["memory", "disk"])
    p.add_argument("--modes", nargs="+", choices=("sync", "async"), default=["sync"])
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of each bank")
    p.add_argument("--async-steps", type=int, default=4,
                   help="async: server steps over the whole bank after the last merge")
    p.add_argument("--json", default=str(HERE / "results" / "load.json"))
    # hub role only
    p.add_argument("--url")
    p.add_argument("--state")
    p.add_argument("--out")
    p.add_argument("--bank", default="disk")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--mode", choices=("sync", "async"), default="sync")
    args = p.parse_args()
    if args.role == "hub":
        hub_main(args)
        return
    from server_hub.broker.mosquitto import BrokerConfig, ManagedBroker, free_port

    runs = []
    with tempfile.TemporaryDirectory(prefix="gkt-load-broker-") as bdir:
        os.chmod(bdir, 0o755)
        broker = ManagedBroker(BrokerConfig(bdir, port=free_port(),
                                            max_packet_size=args.max_payload + 8192))
        with broker:
            plan = [(m, True, n) for m in args.modes if m == "sync"
                    for n in args.full_samples]
            plan += [(m, False, n) for m in args.modes for n in args.collect_samples]
            for mode, full, n in plan:
                for rep in range(args.repeats):  # ABBA: neither bank always goes first
                    for bank in args.banks if rep % 2 == 0 else args.banks[::-1]:
                        cfg = LoadConfig(args.devices, n, args.size, codec=args.codec,
                                         max_payload=args.max_payload)
                        r = run_one(broker.url, cfg, mode, bank, full, args)
                        runs.append(r)
                        print(summary(r), flush=True)
    out = {"bench": "load", "cpu_count": os.cpu_count(), "threads": args.threads,
           "server_epochs": args.server_epochs, "async_steps": args.async_steps,
           "load_average": [round(x, 2) for x in os.getloadavg()],
           "medians": medians(runs), "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
