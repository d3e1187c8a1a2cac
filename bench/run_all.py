"""Run every bench/bench_*.py, one after another, and collect what they measured.

Each script runs with ``--json bench/results/<name>.json`` (plus smaller settings under
``--quick``) and its output goes to bench/results/logs/<name>.log. Then this writes
bench/results/summary.json (machine, per-benchmark status, time and results) and
bench/RESULTS.md (headline figures and one Markdown table per list of rows in each
result). A failing benchmark is recorded and the others still run; the exit code is 1 if
any failed. With --only/--skip, the other benchmarks' last results are kept. Benchmarks
run one at a time: on a shared machine they would skew each other.

Usage: python bench/run_all.py [--quick] [--only edge_cost,hub] [--skip federation]
       [--timeout 3600] [--results bench/results] [--markdown bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cpu_worker import machine_info

BENCH = Path(__file__).resolve().parent

# Smaller settings for a laptop (the whole suite in about 10 minutes on 2 idle cores).
# Scripts not listed run with their defaults in both modes.
QUICK_ARGS: dict[str, list[str]] = {
    "edge_cost": ["--rounds", "5", "--steps", "2"],  # fewer gave ratios off by 2x
    "edge_tuning": ["--rounds", "2", "--calls", "1", "--no-compile", "--batches", "32,64"],
    "device_memory": ["--train-images", "10000", "--test-images", "2000", "--datasets", "digits"],
    "hub": ["--samples", "128", "--rounds", "1"],
    "codecs": ["--sizes", "32", "--samples", "128", "--repeats", "2", "--steps", "10"],
    "transport": ["--messages", "20", "--trips", "20", "--repeats", "2"],
    "federation": ["--rounds", "1", "--codecs", "q8", "--devices", "2"],
    "onnx": ["--runs", "6", "--sizes", "32"],
    "profile": ["--reps", "1", "--steps", "5", "--memory-batches", "16,64"],
    "load": ["--devices", "8", "--collect-samples", "32"],
    "workers": ["--epochs", "1", "--launches", "1"],
    "async": ["--rounds", "4", "--plot", "bench/results/quick/async-vs-sync.png"],
    "predict": ["--train", "600", "--test", "200", "--epochs", "1", "--runs", "10"],
    "own_data": ["--rounds", "2"],
    "photo_decode": ["--photos", "3", "--repeats", "2", "--scan-photos", "8"],
}
# Thread counts in the full run: the device default (one per core) and one thread, which
# holds steady when other processes share the cores.
ARCHIVE = "/work/shared/data/cifar10-train-jpg.tar.gz"  # CIFAR-10 as JPEGs (docs/own-data.md)
FULL_ARGS: dict[str, list[str]] = {"edge_cost": ["--threads", "0,1"],
                                   "uplink": ["--images", ARCHIVE]}
# Hours of server training on a CPU: a --quick run leaves them out (run them alone).
LONG = {"own_accuracy": "8+ rounds of ResNet-55 training, about an hour on 2 cores",
        "uplink": "8 rows x 8 rounds of server training, hours on 2 cores"}
NEEDS_ARCHIVE = {"own_data", "own_accuracy", "predict", "uplink"}


def skip_reason(name: str, quick: bool) -> str | None:
    """Why ``name`` cannot run here (or in a quick run), or None."""
    if quick and name in LONG:
        return f"left out of --quick: {LONG[name]}"
    if name == "hub_gpu":
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU (bench/gpu_check.sh runs it there)"
    if name in NEEDS_ARCHIVE and not Path(ARCHIVE).exists():
        return f"needs the CIFAR-10 JPEG archive at {ARCHIVE}"
    return None


def discover() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH.glob("bench_*.py"))}


def run_one(name: str, script: Path, extra: list[str], results: Path, timeout: float) -> dict:
    out_json = results / f"{name}.json"
    log = results / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(script), *extra, "--json", str(out_json)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                cwd=BENCH.parent).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    record = {"command": " ".join(["python", f"bench/{script.name}", *extra]),
              "started": dt.datetime.now().isoformat(timespec="seconds"),
              "seconds": round(time.perf_counter() - t0, 1), "returncode": rc,
              "log": str(log), "json": str(out_json), "ok": rc == 0 and out_json.exists()}
    if record["ok"]:
        record["result"] = json.loads(out_json.read_text())
    else:
        record["error_tail"] = log.read_text()[-2000:]
    return record


# ---- Markdown ---------------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        a = abs(v)
        return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return str(v).replace("|", "\\|")


def tables(obj, path: str = "") -> list[tuple[str, list[dict]]]:
    """Every list of row dicts inside ``obj`` (depth first), with where it was found."""
    found = []
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        if any(not isinstance(v, (list, dict)) for v in obj[0].values()):
            found.append((path, obj))
        for i, r in enumerate(obj):
            for k, v in r.items():
                found += tables(v, f"{path}[{i}].{k}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found += tables(v, f"{path}.{k}" if path else k)
    return found


def markdown_table(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, (list, dict))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines


def headlines(records: dict[str, dict]) -> list[str]:
    """The figures issue 7 asks for, where their benchmarks ran."""
    out = []
    ec = records.get("edge_cost", {}).get("result")
    if ec:
        out.append("- ResNet-8 training step vs FedAvg's ResNet-56 / ResNet-110 at batch "
                   f"{ec['batch']} ({ec['size']}x{ec['size']}); multiply-add ratios "
                   f"{ec['summary'][0]['resnet56_macs_ratio']:.2f}x / "
                   f"{ec['summary'][0]['resnet110_macs_ratio']:.2f}x:")
        for s in ec["summary"]:
            out.append(f"  - {s['setting']}, {s['threads']} thread(s): ResNet-8 "
                       f"{s['resnet8_step_ms']:.0f} ms/step; wall-time ratio "
                       f"{s['resnet56_time_ratio']:.1f}x / {s['resnet110_time_ratio']:.1f}x "
                       f"(CPU-time {s['resnet56_cpu_time_ratio']:.1f}x / "
                       f"{s['resnet110_cpu_time_ratio']:.1f}x); ResNet-8 at "
                       f"{s['resnet8_gflops']:.1f} GFLOP/s vs a 2048^3 matmul's "
                       f"{s['matmul_gflops']:.0f}")
    dm = records.get("device_memory", {}).get("result")
    if dm:
        imp = dm["import_peak_rss_mb"]
        out.append(f"- Device round (train one epoch, extract + encode, evaluate) at batch "
                   f"{dm['batch']}; bare `import torch` {imp['torch']:.0f} MB with this CUDA "
                   f"wheel (torch + torchvision {imp['torch,torchvision']:.0f} MB); a 1 GB "
                   f"Raspberry Pi 4 has {dm['pi4_1gb_mb']} MB in all:")
        for s, v in dm["summary"].items():
            out.append(f"  - {s} ({v.get('samples', '?')} samples): peak RSS "
                       f"{v['peak_rss_mb']:.0f} MB, {v['peak_above_torch_import_mb']:.0f} MB "
                       "above the bare torch import")
    hub = records.get("hub", {}).get("result")
    if hub:
        for r in hub["rows"]:
            if r["setting"] != "before":
                out.append(f"- Hub {r['model']} {r['job']} on CPU, {r['setting']} "
                           f"({r['threads']} threads, batch {r['batch']}): "
                           f"{r['samples_per_s']:.0f} samples/s "
                           f"({r['speedup']:.1f}x before)")
    return out


def write_markdown(path: Path, info: dict, records: dict[str, dict], quick: bool,
                   started: str, load_end: float, summary: Path) -> None:
    raw = os.path.relpath(summary, path.parent)
    lines = ["# Benchmark results", "",
             f"Written by `python bench/run_all.py{' --quick' if quick else ''}` on {started}. "
             "Each section names the command that produced it and when (a run with --only "
             f"keeps the other sections from earlier runs). Machine: {info['cpu']}, "
             f"{info['cores']} cores, {info['memory_gb']} GB RAM, {info['machine']}, Python "
             f"{info['python']}, torch {info['torch']}. Load average {info['load_average']} at "
             f"the start, {load_end:.1f} at the end: this machine is shared with other work, so "
             "the numbers are noisy; compare ratios within one benchmark (its variants were "
             "interleaved), not absolute times across runs. Raw data: "
             f"[{raw}]({raw}); settings and what did not help: "
             "[docs/performance.md](../docs/performance.md).", ""]
    heads = headlines(records)
    if heads:
        lines += ["## Headline figures", "", *heads, ""]
    for name, rec in records.items():
        if rec.get("skipped"):
            lines += [f"## {name}", "", f"not run: {rec['skipped']}", ""]
            continue
        lines += [f"## {name}", "", f"`{rec['command']}`: {rec['seconds']:.0f} s, started "
                  f"{rec['started']}", ""]
        if not rec["ok"]:
            lines += [f"**failed** (exit {rec['returncode']}); see `{rec['log']}`", ""]
            continue
        for where, rows in tables(rec["result"]):
            lines += [f"{where}:", "", *markdown_table(rows), ""]
    path.write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller settings, for a laptop")
    p.add_argument("--only", help="comma list of names (bench_NAME.py)")
    p.add_argument("--skip", default="", help="comma list of names to leave out")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    p.add_argument("--results", help="folder for the JSON (default bench/results, or "
                   "bench/results/quick with --quick, so a quick run never overwrites the "
                   "full runs' figures that the docs quote)")
    p.add_argument("--markdown", default=str(BENCH / "RESULTS.md"))
    args = p.parse_args()
    scripts = discover()
    names = args.only.split(",") if args.only else list(scripts)
    unknown = [n for n in names if n not in scripts]
    if unknown:
        p.error(f"no bench/bench_<name>.py for {unknown}; have {list(scripts)}")
    names = [n for n in names if n not in args.skip.split(",")]
    results = Path(args.results or BENCH / "results" / ("quick" if args.quick else ""))
    info = machine_info()
    started = dt.datetime.now().isoformat(timespec="seconds")
    records = {}
    for name in names:
        why = skip_reason(name, args.quick)
        if why:
            records[name] = {"skipped": why, "ok": True}
            print(f"[{name}] not run: {why}", flush=True)
            continue
        extra = QUICK_ARGS.get(name, []) if args.quick else FULL_ARGS.get(name, [])
        print(f"[{name}] running ...", flush=True)
        records[name] = run_one(name, scripts[name], extra, results, args.timeout)
        rec = records[name]
        print(f"[{name}] {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']:.0f} s "
              f"(log: {rec['log']})", flush=True)
    load_end = os.getloadavg()[0]
    summary_path = results / "summary.json"
    if (args.only or args.skip) and summary_path.exists():
        # a partial run keeps the other benchmarks' last results (each has its own date)
        previous = json.loads(summary_path.read_text())["benchmarks"]
        records = {**{k: v for k, v in previous.items() if k not in records}, **records}
    summary = {"started": started, "quick": args.quick, "machine": info,
               "load_average_end": round(load_end, 2), "benchmarks": records}
    summary_path.write_text(json.dumps(summary, indent=1))
    write_markdown(Path(args.markdown), info, records, args.quick, started, load_end,
                   summary_path)
    print(f"wrote {results / 'summary.json'} and {args.markdown}")
    return 0 if all(r["ok"] for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
