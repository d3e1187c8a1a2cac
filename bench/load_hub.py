"""The hub process of bench_load.py: one sync round or one async collection, with stats.

It samples its anonymous resident memory (RssAnon: what features held in RAM grow) every
10 ms per phase ("collect": uploads arriving; "train": after every upload is stored), its
peak resident set (VmHWM) and tracemalloc's peak, and times the disk steps of its receive
path (the journal's write and fsync, the feature bank's spill write) with wrappers, so a
run says where the upload time went.

Async: the real AsyncHubService (it trains while uploads arrive); "collect" ends when every
device's upload is merged, then ``--async-steps`` more server steps run over the whole bank
before the hub is stopped (the bank is rebuilt over every device for those).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import tracemalloc
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _time_receive_path(totals: dict[str, float]) -> None:
    """Accumulate seconds spent in the receive path's steps (this process only)."""
    from server_hub.feature_bank import FeatureBank
    from server_hub.intake import UploadIntake
    from server_hub.journal import UploadJournal

    def timed(name: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    UploadIntake.on_up = timed("receive_s", UploadIntake.on_up)  # the whole path, per message
    UploadJournal.record = timed("journal_record_s", UploadJournal.record)
    os.fsync = timed("journal_fsync_s", os.fsync)  # only the journal fsyncs while collecting
    FeatureBank.add = timed("bank_add_s", FeatureBank.add)


def _service(args: argparse.Namespace, state: Path, records: list):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from edge_runtime.learning.data import DataConfig
    from edge_runtime.mqtt.link import LinkConfig, MqttLink
    from server_hub.async_mode.rules import AsyncConfig
    from server_hub.async_mode.service import AsyncHubService
    from server_hub.hub import Hub
    from server_hub.service import HubService, ServiceConfig
    from server_hub.trainer import ServerTrainConfig

    hub = Hub(10, ServerTrainConfig(epochs=args.server_epochs, batch_size=32, device="cpu"),
              feature_dir=state / "features" if args.bank == "disk" else None)
    images = TensorDataset(torch.randn(4, 3, args.size, args.size), torch.randint(0, 10, (4,)))
    payload = args.max_payload + 4096
    link = MqttLink(LinkConfig(args.url, f"hub-load-{os.getpid()}", max_packet_size=payload))
    link.connect()
    cfg = ServiceConfig(str(state), rounds=1, min_devices=args.devices, round_deadline=600,
                        start_timeout=600, max_payload=payload)
    # the maps the senders make are --size wide, so the run admits that size
    common = (DataConfig("digits", image_size=args.size), DataLoader(images, batch_size=4),
              records.append)
    if args.mode == "async":  # one upload each, so it never finishes: stopped by hub_main
        acfg = AsyncConfig(max_updates=args.devices + 1, eval_seconds=3600.0)
        return AsyncHubService(link, hub, cfg, acfg, *common), link
    return HubService(link, hub, cfg, *common), link


def hub_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    receive: dict[str, float] = {}
    _time_receive_path(receive)
    state = Path(args.state)
    records: list = []
    svc, link = _service(args, state, records)
    is_async = args.mode == "async"

    def phase() -> str:
        if is_async:
            return "collect" if svc.ahub.version < args.devices else "train"
        return svc.intake.phase

    peak = {"rss_anon_kb": 0}
    by_phase: dict[str, dict] = {}
    collected: dict[str, float] = {}  # receive timings when the last upload was stored
    done = threading.Event()

    def sample() -> None:
        last, since, train_from = None, time.perf_counter(), None
        while not done.wait(0.01):
            kb, ph = _status_kb("RssAnon"), phase()
            if ph == "train" and not collected:
                collected.update(receive)
                train_from = svc.ahub.steps if is_async else None
                if args.collect_only:
                    done.set()
                    break
            if is_async and train_from is not None and \
                    svc.ahub.steps >= train_from + args.async_steps:
                svc.stop()
            peak["rss_anon_kb"] = max(peak["rss_anon_kb"], kb)
            st = by_phase.setdefault(ph, {"rss_anon_peak_kb": 0, "seconds": 0.0})
            st["rss_anon_peak_kb"] = max(st["rss_anon_peak_kb"], kb)
            now = time.perf_counter()
            if last is not None:
                by_phase[last]["seconds"] += now - since
            last, since = ph, now

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
    banks = [svc.hub.bank] + ([svc.ahub.bank] if is_async else [])
    spilled = sum(f.stat().st_size for f in (state / "features").rglob("*.features"))
    rec = records[0] if records else None
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    Path(args.out).write_text(json.dumps({
        "exit_code": code,
        "samples_in_bank": sum(b.num_samples() for b in banks),
        "round_seconds": rec.seconds if rec and not is_async else None,
        "async_steps": svc.ahub.steps if is_async else None,
        "run_seconds": round(wall, 3),
        "rss_anon_before_mb": mb(base_kb),
        "rss_anon_peak_mb": mb(peak["rss_anon_kb"]),
        "rss_anon_growth_mb": mb(peak["rss_anon_kb"] - base_kb),
        "vm_hwm_mb": mb(_status_kb("VmHWM")),
        "phases": {k: {"rss_anon_peak_mb": mb(v["rss_anon_peak_kb"]),
                       "rss_anon_growth_mb": mb(v["rss_anon_peak_kb"] - base_kb),
                       "seconds": round(v["seconds"], 2)} for k, v in by_phase.items()},
        "receive_path_seconds": {k: round(v, 3) for k, v in (collected or receive).items()},
        "tracemalloc_peak_mb": round(traced_peak / 2**20, 1),
        "resident_feature_mb": round(sum(b.resident_feature_bytes() for b in banks) / 2**20, 1),
        "spilled_feature_mb": round(spilled / 2**20, 1),
        "rejected": dict(svc.intake.rejected),
    }))
    if args.collect_only:
        os._exit(0)  # the round's training is not what this run measures
    link.close()
