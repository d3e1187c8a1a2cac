"""Load: N light devices upload one round at once through a real Mosquitto to a real hub.

The hub runs in its own process (so its memory is its own) and samples its anonymous
resident memory (RssAnon: what features held in RAM would grow) every 10 ms, plus its
peak resident set (VmHWM) and tracemalloc's peak (Python and numpy allocations: decoded
chunks, the in-RAM bank). Each configuration runs with the feature bank in RAM and
spilled to the state directory, so the ratio is read from one run.

"full" runs are whole rounds (collect, train the server, logits back to every device,
evaluate). Server training on a 2-core CPU costs minutes per thousand 16x32x32 samples,
so the larger "collect" runs stop the hub once every upload is stored: that phase is
what grows with devices x samples (training gathers one batch at a time).

    .venv/bin/python bench/bench_load.py            # writes bench/results/load.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from load_senders import LoadConfig, run_senders  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def hub_main(args: argparse.Namespace) -> None:
    """The hub process: one round of ``args.devices`` devices, stats to ``args.out``."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from edge_runtime.data import DataConfig
    from edge_runtime.transport import LinkConfig, MqttLink
    from server_hub.hub import Hub
    from server_hub.service import HubService, ServiceConfig
    from server_hub.trainer import ServerTrainConfig

    torch.set_num_threads(args.threads)
    state = Path(args.state)
    hub = Hub(10, ServerTrainConfig(epochs=args.server_epochs, batch_size=32, device="cpu"),
              feature_dir=state / "features" if args.bank == "disk" else None)
    images = TensorDataset(torch.randn(4, 3, args.size, args.size), torch.randint(0, 10, (4,)))
    payload = args.max_payload + 4096
    link = MqttLink(LinkConfig(args.url, f"hub-load-{os.getpid()}", max_packet_size=payload))
    link.connect()
    records: list = []
    svc = HubService(link, hub, ServiceConfig(str(state), rounds=1, min_devices=args.devices,
                                              round_deadline=600, start_timeout=600,
                                              max_payload=payload),
                     DataConfig("digits"), DataLoader(images, batch_size=4), records.append)
    peak = {"rss_anon_kb": 0}
    by_phase: dict[str, dict] = {}  # collect: receiving uploads; train: train, logits, eval
    done = threading.Event()

    def sample() -> None:
        last, since = None, time.perf_counter()
        while not done.wait(0.01):
            kb, phase = _status_kb("RssAnon"), svc.phase
            if args.collect_only and phase == "train":  # every upload is stored
                done.set()
                break
            peak["rss_anon_kb"] = max(peak["rss_anon_kb"], kb)
            st = by_phase.setdefault(phase, {"rss_anon_peak_kb": 0, "seconds": 0.0})
            st["rss_anon_peak_kb"] = max(st["rss_anon_peak_kb"], kb)
            now = time.perf_counter()
            if last is not None:
                by_phase[last]["seconds"] += now - since
            last, since = phase, now

    base_kb = _status_kb("RssAnon")
    tracemalloc.start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if args.collect_only:
        threading.Thread(target=svc.run, daemon=True).start()
        done.wait()
        time.sleep(2.0)  # let the last acks go out (the network thread sends them)
        code = 0
    else:
        code = svc.run()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    _, traced_peak = tracemalloc.get_traced_memory()
    spilled = sum(f.stat().st_size for f in (state / "features").glob("*.features"))
    rec = records[0] if records else None
    Path(args.out).write_text(json.dumps({
        "exit_code": code,
        "samples_in_bank": hub.bank.num_samples(),
        "round_seconds": rec.seconds if rec else None,
        "run_seconds": round(wall, 3),
        "upload_bytes": rec.upload_bytes if rec else None,
        "rss_anon_before_mb": round(base_kb / 1024, 1),
        "rss_anon_peak_mb": round(peak["rss_anon_kb"] / 1024, 1),
        "rss_anon_growth_mb": round((peak["rss_anon_kb"] - base_kb) / 1024, 1),
        "vm_hwm_mb": round(_status_kb("VmHWM") / 1024, 1),
        "phases": {k: {"rss_anon_peak_mb": round(v["rss_anon_peak_kb"] / 1024, 1),
                       "rss_anon_growth_mb": round((v["rss_anon_peak_kb"] - base_kb) / 1024, 1),
                       "seconds": round(v["seconds"], 2)} for k, v in by_phase.items()},
        "tracemalloc_peak_mb": round(traced_peak / 2**20, 1),
        "resident_feature_mb": round(hub.bank.resident_feature_bytes() / 2**20, 1),
        "spilled_feature_mb": round(spilled / 2**20, 1),
        "rejected": dict(svc.rejected),
    }))
    if args.collect_only:
        os._exit(0)  # the round's training is not what this run measures
    link.close()


def run_one(url: str, cfg: LoadConfig, bank: str, full: bool,
            args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="gkt-load-") as tmp:
        out = Path(tmp) / "hub.json"
        cmd = [sys.executable, __file__, "--role", "hub", "--url", url, "--state",
               str(Path(tmp) / "hub"), "--out", str(out), "--bank", bank,
               "--devices", str(cfg.devices), "--size", str(cfg.size),
               "--max-payload", str(cfg.max_payload), "--threads", str(args.threads),
               "--server-epochs", str(args.server_epochs)]
        cmd += [] if full else ["--collect-only"]
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
        "run": "full" if full else "collect", "bank": bank, "devices": cfg.devices,
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
    return (f"{r['run']:>7} {r['bank']:>6} bank: {r['devices']} devices x "
            f"{r['samples_per_device']} samples, {r['upload_bytes'] / 1e6:.1f} MB up in "
            f"{r['upload_seconds_max']:.1f}s (all at once); hub RssAnon "
            f"+{collect.get('rss_anon_growth_mb')} MB collecting, "
            f"+{h['rss_anon_growth_mb']} MB overall (peak {h['rss_anon_peak_mb']} MB), "
            f"tracemalloc peak {h['tracemalloc_peak_mb']} MB; all samples once: "
            f"{r['every_sample_in_bank_once']}, logits once: {r['every_logit_back_once']}")


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
    p.add_argument("--json", default=str(HERE / "results" / "load.json"))
    # hub role only
    p.add_argument("--url")
    p.add_argument("--state")
    p.add_argument("--out")
    p.add_argument("--bank", default="disk")
    p.add_argument("--collect-only", action="store_true")
    args = p.parse_args()
    if args.role == "hub":
        hub_main(args)
        return
    from server_hub.broker import BrokerConfig, ManagedBroker, free_port

    runs = []
    with tempfile.TemporaryDirectory(prefix="gkt-load-broker-") as bdir:
        os.chmod(bdir, 0o755)
        broker = ManagedBroker(BrokerConfig(bdir, port=free_port(),
                                            max_packet_size=args.max_payload + 8192))
        with broker:
            plan = [(True, n) for n in args.full_samples] + [(False, n)
                                                             for n in args.collect_samples]
            for full, n in plan:
                for bank in args.banks:
                    cfg = LoadConfig(args.devices, n, args.size, codec=args.codec,
                                     max_payload=args.max_payload)
                    r = run_one(broker.url, cfg, bank, full, args)
                    runs.append(r)
                    print(summary(r), flush=True)
    out = {"bench": "load", "cpu_count": os.cpu_count(), "threads": args.threads,
           "server_epochs": args.server_epochs, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
