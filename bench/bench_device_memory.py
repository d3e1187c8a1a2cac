"""Peak RSS of a device process doing what `gkt-edge run` does in a round, before and after
the speed work, against a 1 GB Raspberry Pi 4.

A child process per setting (run in turn) loads CIFAR-10 (or the digits, at 32x32) the way
the CLI does (the training split twice: augmented and plain, which share one copy of the
images; the test split for the local evaluation), builds an
``EdgeDevice`` on one shard, trains one local epoch, extracts and encodes its features
into upload chunks (codec q8), and evaluates the local classifier on the test split. After
each phase it reads VmRSS and VmHWM (the peak) from /proc/self/status; the peak is reset
between phases (/proc/self/clear_refs) where the kernel allows it, so each phase's own
peak shows. CIFAR-10 here is random images in the real file format (the machine is
offline); only sizes matter. Bare `import torch` (and torchvision) is measured the same way:
this machine's torch is the CUDA wheel, whose import costs more than a Pi's CPU build, so
the figure to set against a Pi is the peak above the bare `import torch`. The device imports
torchvision (lazily) only to read CIFAR; that cost shows in the data phase (and
``import torchvision`` imports torch._dynamo, see "compiler" below).

Settings: "before" (the speed settings off), "torch-adam" (the defaults, but training with
``torch.optim.Adam(amsgrad=True)``, whose first use imports torch._dynamo: the device's
optimizer before ``edge_runtime/optimizer.py``), "after" (the defaults), "after+bf16". Each
phase records whether torch._dynamo has been imported by then ("compiler"). With
``--repeats N`` each setting runs N times, interleaved, and the summary quotes medians.

Usage: python bench/bench_device_memory.py [--batch 64] [--train-images 50000]
       [--shards 8] [--threads 0] [--datasets cifar10,digits] [--repeats 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import write_results  # noqa: E402

MB = 1024 * 1024
PI4_1GB_MB = 1024  # nominal; the OS, the GPU's share of RAM and buffers come out of it


def status_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def write_fake_cifar10(root: Path, n_train: int, n_test: int) -> None:
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name: str, n: int) -> None:
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [i % 10 for i in range(n)]}, f)

    for i in range(5):
        batch(f"data_batch_{i + 1}", n_train // 5)
    batch("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def child(args: argparse.Namespace) -> None:
    """One device round; prints one JSON line: phases with RSS / peak in MB, seconds."""
    phases = []
    resettable = reset_peak()

    def mark(name: str, t0: float) -> None:
        phases.append({"phase": name, "seconds": time.perf_counter() - t0, **status_mb(),
                       "compiler": "torch._dynamo" in sys.modules})
        reset_peak()

    t = time.perf_counter()
    mark("python", t)
    if args.imports_only is not None:
        for module in args.imports_only.split(","):
            __import__(module)
        mark(f"import {args.imports_only}", t)
        print(json.dumps({"phases": phases}))
        return
    t = time.perf_counter()
    import torch

    from edge_runtime.device.edge_device import EdgeDevice
    from edge_runtime.device.upload import rebatch
    from edge_runtime.learning.data import DataConfig, load_split, make_loader
    from edge_runtime.learning.partition import partition
    from edge_runtime.learning.train import EdgeTrainConfig
    from edge_runtime.protocol.messages import feature_chunk
    mark("imports (torch, edge_runtime, paho)", t)

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    if args.dataset == "cifar10":
        import torchvision.datasets.cifar

        # our files, so the md5 sums of the real archive cannot match
        torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    size = 32  # the digits upsampled to CIFAR's size, so the model's work is the same
    data = DataConfig(args.dataset, args.root, size)
    plain = DataConfig(args.dataset, args.root, size, augment=False)
    train, train_eval = load_split(data, True), load_split(plain, True)  # as gkt-edge does
    test_loader = make_loader(load_split(plain, False).dataset, 256, shuffle=False)
    ids = partition(train.targets, args.shards, "iid", 0)[0]
    mark(f"{args.dataset} loaded (train x2, test)", t)

    before = args.setting == "before"
    cfg = EdgeTrainConfig(batch_size=args.batch, channels_last=not before,
                          reuse_memory=not before, extract_backend="eager" if before else "folded",
                          precision="bf16" if args.setting == "after+bf16" else "fp32")
    t = time.perf_counter()
    device = EdgeDevice("dev0", train, train_eval, ids, 10, cfg)
    if before:
        device.model.pool = torch.nn.AdaptiveAvgPool2d(1)  # the edge model before the speed work
    if before or args.setting == "torch-adam":  # the device's optimizer before AmsgradAdam
        device.optimizer = torch.optim.Adam(device.model.parameters(), lr=cfg.lr,
                                            weight_decay=cfg.weight_decay, amsgrad=True)
    mark("EdgeDevice built", t)
    t = time.perf_counter()
    stats = device.train()
    mark(f"1 local epoch ({stats.samples} samples, batch {args.batch})", t)
    t = time.perf_counter()
    nbytes = sum(len(feature_chunk("dev0", 0, "m", 0, 1, b, "q8"))
                 for b in rebatch(device.features(), 64))
    mark("extract + encode features (q8)", t)
    t = time.perf_counter()
    device.local_accuracy(test_loader)
    mark("local evaluation (test split, batch 256)", t)
    print(json.dumps({"phases": phases, "peak_resettable": resettable, "upload_bytes": nbytes,
                      "samples": stats.samples, "threads": torch.get_num_threads()}))


def run_child(args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", "--root", args.root, "--batch", str(args.batch),
           "--shards", str(args.shards), "--threads", str(args.threads),
           "--dataset", args.dataset, *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-images", type=int, default=50_000)
    p.add_argument("--test-images", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=8, help="devices; this one trains 1 shard")
    p.add_argument("--threads", type=int, default=0, help="0 = torch's default, as gkt-edge")
    p.add_argument("--datasets", default="cifar10,digits",
                   help="comma list of cifar10, digits (all 1,438 train images, no torchvision)")
    p.add_argument("--dataset", default="cifar10", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=1, help="runs per setting (medians)")
    p.add_argument("--json", default="bench/results/device_memory.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--setting", default="after", help=argparse.SUPPRESS)
    p.add_argument("--imports-only", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from cpu_worker import machine_info

    info = machine_info()
    runs: dict[str, list[dict]] = {}
    imports: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        args.root = root
        write_fake_cifar10(Path(root), args.train_images, args.test_images)
        for _ in range(args.repeats):  # interleaved: every setting once per repeat
            for m in ("torch", "torch,torch._dynamo", "torch,torchvision"):
                imports.setdefault(m, []).append(
                    run_child(args, ["--imports-only", m])["phases"][-1]["VmHWM"])
            for dataset in args.datasets.split(","):
                # the digits are small: one device holds all 1,438 training images
                sub = argparse.Namespace(**{**vars(args), "dataset": dataset,
                                            "shards": args.shards if dataset == "cifar10" else 1})
                for setting in ("before", "torch-adam", "after", "after+bf16"):
                    runs.setdefault(f"{dataset}/{setting}", []).append(
                        run_child(sub, ["--setting", setting]))
    import_mb = {m: statistics.median(v) for m, v in imports.items()}
    rows = []
    summary = {}
    for key, repeats in runs.items():
        dataset, setting = key.split("/", 1)
        peaks = [max(ph["VmHWM"] for ph in r["phases"]) for r in repeats]
        for ph in repeats[-1]["phases"]:  # the phases of the last repeat
            rows.append({"dataset": dataset, "setting": setting, "phase": ph["phase"],
                         "rss_mb": ph["VmRSS"], "phase_peak_mb": ph["VmHWM"],
                         "seconds": ph["seconds"], "compiler": ph["compiler"]})
        peak = statistics.median(peaks)
        summary[key] = {"peak_rss_mb": peak, "peak_rss_mb_runs": peaks,
                        "peak_above_torch_import_mb": peak - import_mb["torch"],
                        "compiler_imported": repeats[-1]["phases"][-1]["compiler"],
                        "samples": repeats[-1]["samples"], "threads": repeats[-1]["threads"]}

    print(f"\nCIFAR-10: {args.train_images} random train images, 1 of {args.shards} shards; "
          f"digits: all; batch {args.batch}; {info['cpu']}, torch {info['torch']}")
    print(f"bare imports: torch {import_mb['torch']:.0f} MB, torch + torch._dynamo (what "
          f"torch.optim's first use imports) {import_mb['torch,torch._dynamo']:.0f} MB, torch + "
          f"torchvision {import_mb['torch,torchvision']:.0f} MB (peak RSS, median of "
          f"{args.repeats})")
    print(f"{'dataset':8} {'setting':10} {'phase':48} {'RSS MB':>7} {'peak MB':>8} {'s':>6} "
          f"compiler")
    for r in rows:
        print(f"{r['dataset']:8} {r['setting']:10} {r['phase']:48} {r['rss_mb']:>7.0f} "
              f"{r['phase_peak_mb']:>8.0f} {r['seconds']:>6.1f} {r['compiler']}")
    for k, v in summary.items():
        print(f"{k}: peak RSS {v['peak_rss_mb']:.0f} MB (median of {args.repeats}), "
              f"{v['peak_above_torch_import_mb']:.0f} MB above the bare torch import; "
              f"torch._dynamo imported: {v['compiler_imported']}")
    out = {**info, "load_average_end": round(os.getloadavg()[0], 2), "batch": args.batch,
           "train_images": args.train_images, "shards": args.shards,
           "peak_resettable": next(iter(runs.values()))[0]["peak_resettable"],
           "repeats": args.repeats, "import_peak_rss_mb": import_mb,
           "import_peak_rss_mb_runs": imports, "pi4_1gb_mb": PI4_1GB_MB, "summary": summary,
           "rows": rows}
    write_results(args.json, out)


if __name__ == "__main__":
    main()
