"""A device training on its own image folder: decode rate, peak RSS, and round time against
the in-memory path, on real CIFAR-10 JPEGs.

From the CIFAR-10 training JPEGs (``train/<class>/NNNN.jpg``) it takes 500 images a class
(5,000, files 0000-0499) for the devices and the next 100 a class (1,000, files 0500-0599)
as held-out images, and splits the 5,000 over 4 device folders (links) by Dirichlet(0.5)
per class, seeded (``split_folder``, what ``gkt-hub simulate --split-data`` uses).

Measured, each in a fresh child process (``--child``):
- decode rate, first pass: every device folder scanned with an empty state dir (read,
  hash, decode, resize, cache); cached: the same folders scanned by a new process on the
  same state dirs (a restarted device: nothing decoded again); rescan: a second scan in
  the same process (what every round does before training).
- a round on the largest device folder, own data vs the in-memory path: rescan + one
  local epoch + feature extraction, against one local epoch + extraction on the same
  uint8 images held as the academic datasets hold them (``U8Images`` indexed by position,
  no rescan). Interleaved, ``--rounds`` each; medians and their ratio.
- the device's peak RSS (VmHWM) after scanning and after those rounds, own data only.

Not measured here: accuracy per round over real MQTT against the shard path on the same
images; that needs the hub to evaluate on an image folder (``gkt-hub serve --test-data``).

Usage: python bench/bench_own_data.py [--tar PATH] [--work DIR] [--rounds 5]
       [--threads 0] [--json bench/results/own_data.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TAR = "/work/shared/data/cifar10-train-jpg.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
TRAIN_PER_CLASS, HELD_OUT_PER_CLASS, DEVICES = 500, 100, 4
MB = 1024 * 1024


def vm_mb() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in
                (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def prepare(tar: Path, work: Path) -> tuple[Path, Path, list[Path]]:
    """work/train (5,000), work/test (1,000), work/split/device-K (links into train)."""
    train, test, split = work / "train", work / "test", work / "split"
    if not (work / "extracted").exists():
        t0 = time.perf_counter()
        with tarfile.open(tar) as tf:
            for m in tf:
                parts = m.name.split("/")
                if not m.isfile() or len(parts) != 3 or parts[1] not in CLASSES:
                    continue
                n = int(Path(parts[2]).stem)
                if n >= TRAIN_PER_CLASS + HELD_OUT_PER_CLASS:
                    continue
                dest = (train if n < TRAIN_PER_CLASS else test) / parts[1] / parts[2]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tf.extractfile(m).read())
        (work / "extracted").touch()
        print(f"extracted 6,000 JPEGs in {time.perf_counter() - t0:.1f} s")
    if not split.exists():
        from edge_runtime.learning.image_folders import split_folder

        split_folder(train, split, DEVICES, "dirichlet:0.5", seed=0)
    return train, test, sorted(split.glob("device-*"))


def folder_run(test: Path, folders: list[Path], *flags: str):
    """(FederationConfig, RunPlan) of `gkt-hub simulate --test-data TEST --device-data F...
    FLAGS`: one run spec for every path a benchmark compares."""
    from server_hub.cli.main import build_parser, federation_config
    from server_hub.cli.run_options import plan_run

    argv = ["simulate", "--test-data", str(test), "--no-progress", *flags]
    for f in folders:
        argv += ["--device-data", str(f)]
    sim = build_parser().parse_args(argv)
    sim.devices = len(folders)
    cfg = federation_config(sim)
    return cfg, plan_run(sim, cfg, cfg.codec, 600.0)


def own_data(folder: Path, state: Path):
    from edge_runtime.learning.catalog import ImageCatalog
    from edge_runtime.learning.data import NORMALIZATION
    from edge_runtime.learning.own_data import DataSpec, OwnData, OwnDataConfig
    from edge_runtime.learning.preprocess import Preprocess

    mean, std = NORMALIZATION["cifar10"]
    spec = DataSpec(CLASSES, Preprocess(size=32, mean=mean, std=std))
    return OwnData(OwnDataConfig(str(folder), spec, val_fraction=0.1),
                   ImageCatalog(state / "own-data.sqlite"))


def child_scan(folders: list[Path], states: Path) -> dict:
    """Scan every folder (first pass or cached, by the state dirs' content), then rescan."""
    out = []
    for folder in folders:
        data = own_data(folder, states / folder.name)
        t0 = time.perf_counter()
        r = data.scan()
        t1 = time.perf_counter()
        data.scan()
        t2 = time.perf_counter()
        n = len(r.train.ids) + len(r.val.ids)
        out.append({"folder": folder.name, "images": n, "decoded": r.decoded,
                    "scan_s": t1 - t0, "rescan_s": t2 - t1})
    return {"folders": out, "vm_mb": vm_mb()}


def child_rounds(folder: Path, state: Path, rounds: int, compare: bool, threads: int) -> dict:
    import numpy as np
    import torch

    from edge_runtime.device.edge_device import EdgeDevice
    from edge_runtime.device.own_data_source import OwnDataSource, splits
    from edge_runtime.learning.train import EdgeTrainConfig

    if threads:
        torch.set_num_threads(threads)
    cfg = EdgeTrainConfig(epochs=1, batch_size=64)
    source = OwnDataSource(own_data(folder, state))
    after_scan = vm_mb()
    train, train_eval, ids, positions = source.device_args()
    own = EdgeDevice("own", train, train_eval, ids, len(CLASSES), cfg, positions=positions,
                     ids_may_change=True)
    devices = {"own_data": own}
    if compare:  # the academic in-memory path: the same uint8 images, ids = positions
        images = source.result.train
        mem_train, mem_eval = splits(images, source.normalization, True)
        devices["in_memory"] = EdgeDevice("mem", mem_train, mem_eval,
                                          np.arange(len(images.ids)), len(CLASSES), cfg)
    times: dict[str, list[float]] = {k: [] for k in devices}
    for _ in range(rounds):
        for name, dev in devices.items():
            t0 = time.perf_counter()
            if name == "own_data":
                source.refresh(dev)
            dev.train()
            for _batch in dev.features():
                pass
            times[name].append(time.perf_counter() - t0)
    return {"samples": own.num_samples, "round_s": times, "vm_mb_after_scan": after_scan,
            "vm_mb": vm_mb()}


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tar", default=TAR)
    p.add_argument("--work", default="/tmp/gkt-bench-own-data")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default="bench/results/own_data.json")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "scan":
            result = child_scan([Path(f) for f in rest[1:]], Path(rest[0]))
        else:
            folder, state, compare = Path(rest[0]), Path(rest[1]), rest[2] == "1"
            result = child_rounds(folder, state, args.rounds, compare, args.threads)
        print(json.dumps(result))
        return

    work = Path(args.work)
    _, test, folders = prepare(Path(args.tar), work)
    states = work / "states"
    if states.exists():
        import shutil

        shutil.rmtree(states)
    first = run_child("scan", str(states), *map(str, folders))
    cached = run_child("scan", str(states), *map(str, folders))

    def rate(run: dict, key: str) -> float:
        return sum(f["images"] for f in run["folders"]) / sum(f[key] for f in run["folders"])

    largest = max(first["folders"], key=lambda f: f["images"])["folder"]
    folder = work / "split" / largest
    timing = run_child("rounds", str(folder), str(states / largest), "1")
    memory = run_child("rounds", str(folder), str(states / "rss-device"), "0")
    med = {k: statistics.median(v) for k, v in timing["round_s"].items()}
    result = {
        "images": sum(f["images"] for f in first["folders"]), "held_out": 1000,
        "split": {f["folder"]: f["images"] for f in first["folders"]},
        "decode_rate_first_pass_per_s": rate(first, "scan_s"),
        "decode_rate_cached_restart_per_s": rate(cached, "scan_s"),
        "rescan_rate_in_process_per_s": rate(first, "rescan_s"),
        "decoded_first_pass": sum(f["decoded"] for f in first["folders"]),
        "decoded_after_restart": sum(f["decoded"] for f in cached["folders"]),
        "round_device": largest, "round_samples": timing["samples"],
        "round_s": timing["round_s"], "round_median_s": med,
        "round_ratio_own_over_memory": med["own_data"] / med["in_memory"],
        "device_peak_rss_mb_after_scan": memory["vm_mb_after_scan"]["VmHWM"],
        "device_peak_rss_mb_after_rounds": memory["vm_mb"]["VmHWM"],
        "scan_process_peak_rss_mb": first["vm_mb"]["VmHWM"],
        "rounds": args.rounds, "threads": args.threads or "torch default",
        "cpu_count": os.cpu_count(), "source": args.tar, "held_out_folder": str(test),
    }
    rows = [
        ("images (4 device folders)", f"{result['images']:,}"),
        ("decode, first pass", f"{result['decode_rate_first_pass_per_s']:,.0f} images/s"),
        ("decode, cached (restart)", f"{result['decode_rate_cached_restart_per_s']:,.0f} "
                                     f"images/s ({result['decoded_after_restart']} decoded)"),
        ("rescan, in process", f"{result['rescan_rate_in_process_per_s']:,.0f} images/s"),
        (f"round, own data ({largest}, {timing['samples']} samples)",
         f"{med['own_data']:.2f} s (median of {args.rounds})"),
        ("round, in-memory path", f"{med['in_memory']:.2f} s"),
        ("own data / in-memory", f"{result['round_ratio_own_over_memory']:.3f}"),
        ("device peak RSS after scan", f"{result['device_peak_rss_mb_after_scan']:.0f} MB"),
        ("device peak RSS after rounds", f"{result['device_peak_rss_mb_after_rounds']:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
