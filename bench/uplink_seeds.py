"""Rows of bench_uplink.py over several seeds: each row against a reference row, paired by seed.

One run's test accuracy swings by a few points from one round to the next, so one seed
cannot rank rows that differ by a point. Every seed runs the same folders and rounds;
only the training's randomness changes, so differences are taken seed by seed.

    .venv/bin/python bench/uplink_seeds.py bench/results/uplink-cifar10*.json \
        --reference fp32/full --json bench/results/uplink-cifar10-seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from results_file import write_results


def load(paths: list[str]) -> dict[str, dict[int, dict]]:
    """row -> seed -> {final, last3, upload_bytes}; the first file wins for a (row, seed).
    Files that are not bench_uplink runs with accuracy (this script's own output, a
    ``--bytes-only`` run) are skipped, so a glob may name them."""
    rows: dict[str, dict[int, dict]] = {}
    for path in paths:
        d = json.loads(Path(path).read_text())
        if d.get("bench") != "uplink" or d["setting"].get("bytes_only"):
            print(f"skipped {path}: not a bench_uplink run with accuracy")
            continue
        seed = d["setting"]["seed"]
        for name, r in d["rows"].items():
            acc = r["accuracy_per_round"]
            rows.setdefault(name, {}).setdefault(seed, {
                "final": r["final_accuracy"], "last3": sum(acc[-3:]) / len(acc[-3:]),
                "upload_bytes": r["upload_bytes"], "file": Path(path).name})
    return rows


def paired(rows: dict[str, dict[int, dict]], reference: str) -> dict[str, dict]:
    """Per row: its seeds in common with the reference, mean and standard error of the
    differences in points (final round, mean of the last 3 rounds)."""
    base = rows[reference]
    out = {}
    for name, by_seed in sorted(rows.items()):
        seeds = sorted(set(by_seed) & set(base))
        if name == reference or len(seeds) < 2:
            continue
        entry = {"seeds": seeds}
        for key in ("final", "last3"):
            diffs = [100 * (by_seed[s][key] - base[s][key]) for s in seeds]
            entry[f"{key}_points"] = [round(x, 2) for x in diffs]
            entry[f"{key}_mean"] = round(statistics.mean(diffs), 2)
            entry[f"{key}_se"] = round(statistics.stdev(diffs) / len(diffs) ** 0.5, 2)
        entry["mean_accuracy_final"] = round(statistics.mean(by_seed[s]["final"] for s in seeds), 4)
        entry["mean_upload_mb"] = round(
            statistics.mean(by_seed[s]["upload_bytes"] for s in seeds) / 1e6, 2)
        out[name] = entry
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="bench_uplink.py JSON files, one seed each")
    p.add_argument("--reference", default="fp32/full")
    p.add_argument("--json")
    args = p.parse_args()
    rows = load(args.files)
    table = paired(rows, args.reference)
    ref = rows[args.reference]
    print(f"against {args.reference} (mean final accuracy "
          f"{statistics.mean(v['final'] for v in ref.values()):.4f} over {len(ref)} seeds), "
          "points, mean +- standard error:")
    for name, e in table.items():
        print(f"  {name:14s} seeds {len(e['seeds'])}  final {e['final_mean']:+.2f} +- "
              f"{e['final_se']:.2f}  last 3 rounds {e['last3_mean']:+.2f} +- {e['last3_se']:.2f}"
              f"  uplink {e['mean_upload_mb']:.2f} MB")
    if args.json:
        write_results(args.json, {"bench": "uplink_seeds", "reference": args.reference,
                                  "files": sorted({Path(f).name for f in args.files}),
                                  "rows": {n: {str(s): v for s, v in by.items()}
                                           for n, by in rows.items()},
                                  "against_reference": table})


if __name__ == "__main__":
    main()
