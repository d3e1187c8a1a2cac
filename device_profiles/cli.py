"""``gkt-profile``: which devices can train the edge model, how fast, for how much.

    gkt-profile devices [--catalog DIR] [--json]
    gkt-profile models [--json] [--onnx PATH ...] [--measure-batches 16,64]
    gkt-profile calibrate [--models resnet8,resnet56,resnet110] [--batches 64] [--steps 20]
    gkt-profile report --devices all --batch 64 --format md|html|json --out PATH

Exit codes: 0 success, 1 a measurement failed, 2 bad arguments or catalog files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from device_profiles.catalog import CatalogError, load_catalog, select, spec_to_dict
from device_profiles.estimate import human_bytes

FORMATS = ("md", "html", "json")


def _progress(quiet: bool) -> Callable[[str], None]:
    t0 = time.perf_counter()

    def report(msg: str) -> None:
        if not quiet:
            print(f"[gkt-profile {time.perf_counter() - t0:5.1f}s] {msg}", file=sys.stderr,
                  flush=True)

    return report


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


# ---- devices ---------------------------------------------------------------------------

def cmd_devices(args: argparse.Namespace) -> int:
    specs = load_catalog(args.catalog)
    if args.json:
        print(json.dumps([spec_to_dict(s) for s in specs], indent=1))
        return 0
    print(f"{'id':18} {'RAM':>7} {'CPU GFLOP/s':>12} {'GPU GFLOP/s':>12} {'W':>5} {'USD':>6}  "
          "estimates")
    for s in specs:
        est = sum(q.estimate for q in s.quantities().values())
        gpu = f"{s.gpu_peak_gflops.value:.0f}" if s.gpu_peak_gflops else "-"
        print(f"{s.id:18} {s.ram_gib.value:5.0f}GB {s.cpu_peak_gflops.value:12.1f} {gpu:>12} "
              f"{s.power_w.value if s.power_w else 0:5.1f} "
              f"{s.price_usd.value if s.price_usd else 0:6.0f}  "
              f"{est}/{len(s.quantities())} fields")
    print(f"{len(specs)} devices valid (built-in catalog"
          + (f" + {', '.join(args.catalog)}" if args.catalog else "") + ")")
    return 0


# ---- models ----------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from device_profiles.memory import measure_training_peak
    from device_profiles.model_zoo import MODELS, profile_model
    from device_profiles.onnx_graph import onnx_profile

    progress = _progress(args.quiet or args.json)
    names = args.models or tuple(MODELS)
    rows = []
    for name in names:
        progress(f"profiling {name}")
        p = profile_model(name, args.classes, args.size)
        cost = p.cost()
        row = {
            "name": p.name, "title": p.title, "role": p.role, "params": p.params,
            "forward_macs": p.forward_macs, "conv_linear_macs": p.conv_linear_macs,
            "forward_macs_by_operator": p.forward_macs_by_operator,
            "train_flops_per_sample": p.train_flops_per_sample,
            "forward_flops_per_sample": p.forward_flops_per_sample,
            "saved_activation_bytes_per_sample": p.activations.saved_per_sample,
            "conventions": p.conventions, "memory": [],
        }
        if args.by_module:
            row["forward_macs_by_module"] = p.forward_macs_by_module
        for batch in args.measure_batches:
            progress(f"measuring {name} training memory at batch {batch} (fresh process)")
            m = measure_training_peak(name, batch, args.classes, args.size)
            row["memory"].append({"batch": batch, "predicted_bytes": cost.training_bytes(batch),
                                  **dataclasses.asdict(m)})
        rows.append(row)
    onnx = []
    for path in args.onnx:
        onnx.append(dataclasses.asdict(onnx_profile(path)))
    if args.json:
        print(json.dumps({"models": rows, "onnx": onnx}, indent=1))
        return 0
    print(f"{'model':26} {'params':>10} {'fwd MMACs':>10} {'train MFLOP':>12} "
          f"{'saved/sample':>13}")
    for r in rows:
        print(f"{r['title']:26} {r['params']:>10,} {r['conv_linear_macs'] / 1e6:>10.3f} "
              f"{r['train_flops_per_sample'] / 1e6:>12.1f} "
              f"{human_bytes(r['saved_activation_bytes_per_sample']):>13}")
        for m in r["memory"]:
            err = m["allocator_peak_bytes"] / m["predicted_bytes"] - 1
            print(f"    batch {m['batch']}: training peak {human_bytes(m['allocator_peak_bytes'])}"
                  f" measured, {human_bytes(m['predicted_bytes'])} predicted ({100 * err:+.1f}%);"
                  f" process RSS {human_bytes(m['process_peak_rss_bytes'])}")
    for o in onnx:
        print(f"{o['path']}: {o['params']:,} params, {human_bytes(o['file_bytes'])}, "
              f"{o['macs_per_sample'] / 1e6:.3f} M MACs/sample")
    print("fwd MMACs: fvcore conv+linear, 1 flop = 1 multiply-add, forward only. train MFLOP: "
          "torch FlopCounterMode, 2 flops per multiply-add, forward + backward, per sample.")
    return 0


# ---- calibrate -------------------------------------------------------------------------

def cmd_calibrate(args: argparse.Namespace) -> int:
    from device_profiles.calibrate import calibrate
    from device_profiles.calibration import save_calibration

    progress = _progress(args.quiet)
    cal = calibrate(args.models, args.batches, args.steps, progress=progress)
    path = save_calibration(cal, args.state)
    print(f"peak {cal.peak_gflops:.0f} GFLOP/s ({cal.peak_source}); "
          f"large matmul {cal.matmul_gflops:.1f} GFLOP/s")
    for p in cal.points:
        print(f"{p.model} batch {p.batch}: {p.step_seconds * 1e3:.1f} ms/step, "
              f"{p.achieved_gflops:.1f} GFLOP/s = {100 * p.efficiency:.1f}% of peak")
    print(f"saved to {path}")
    return 0


# ---- report ----------------------------------------------------------------------------

def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    if args.out:
        suffix = Path(args.out).suffix.lstrip(".").lower()
        if suffix in FORMATS:
            return suffix
        if suffix == "htm":
            return "html"
    return "md"


def cmd_report(args: argparse.Namespace) -> int:
    from device_profiles.calibrate import calibrated_this_machine
    from device_profiles.calibration import load_calibration
    from device_profiles.estimate import Settings
    from device_profiles.render import render_html, render_json, render_markdown, write_markdown
    from device_profiles.report import build_report, collect_inputs
    from device_profiles.this_machine import THIS_MACHINE_ID

    fmt = _format(args)
    settings = Settings(args.batch, args.samples, args.epochs, args.codec, args.link_mbps)
    cal = load_calibration(args.state)
    specs = load_catalog(args.catalog)
    if args.devices.strip() == "all" or THIS_MACHINE_ID in args.devices:
        specs.append(calibrated_this_machine(cal))
    devices = select(specs, args.devices)
    progress = _progress(args.quiet)
    if cal is None:
        progress("no calibration found: CPU times use a default efficiency "
                 "(run `gkt-profile calibrate` for measured ones)")
    inputs = collect_inputs(settings, devices, cal, measure=not args.no_measure,
                            progress=progress, onnx_paths=args.onnx)
    report = build_report(inputs)
    out = Path(args.out) if args.out else None
    if fmt == "json":
        text = render_json(report)
    else:
        figures = {}
        if fmt == "html" or out is not None:
            from device_profiles.plots import render_all

            progress("drawing plots")
            figures = render_all(report)
        if fmt == "md" and out is not None:
            for path in write_markdown(report, figures, out):
                progress(f"wrote {path}")
            return 0
        text = render_html(report, figures) if fmt == "html" else render_markdown(report)
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        progress(f"wrote {out}")
    return 0


# ---- main ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from device_profiles.calibration import STATE_ENV

    p = argparse.ArgumentParser(prog="gkt-profile", description=__doc__.split("\n\n")[0])
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for measuring (default: torch's); calibrate and "
                        "report with the same number")
    sub = p.add_subparsers(dest="command", required=True)
    cat_help = "extra directory of device *.toml files (repeatable)"

    d = sub.add_parser("devices", help="list and validate the device catalog")
    d.add_argument("--catalog", action="append", default=[], metavar="DIR", help=cat_help)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_devices)

    m = sub.add_parser("models", help="parameters, FLOPs and memory of the toolkit's models")
    m.add_argument("--json", action="store_true")
    m.add_argument("--models", type=_csv, default=(), help="comma-separated (default: all)")
    m.add_argument("--classes", type=int, default=10)
    m.add_argument("--size", type=int, default=32, help="input side in pixels")
    m.add_argument("--by-module", action="store_true", help="include fvcore's per-module counts")
    m.add_argument("--measure-batches", type=_csv_ints, default=(), metavar="B,B",
                   help="measure peak training memory at these batch sizes (slow)")
    m.add_argument("--onnx", action="append", default=[], metavar="PATH",
                   help="also profile an exported .onnx graph (repeatable)")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("calibrate", help="measure this machine's efficiency on the real step")
    c.add_argument("--models", type=_csv, default=("resnet8",),
                   help="models to time (add resnet56,resnet110 for a fair FedAvg comparison)")
    c.add_argument("--batches", type=_csv_ints, default=(64,))
    c.add_argument("--steps", type=int, default=20, help="timed steps per model and batch")
    c.add_argument("--state", default=None, metavar="PATH",
                   help=f"calibration file (default: ${STATE_ENV} or ~/.local/state/...)")
    c.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("report", help="the hardware-selection report")
    r.add_argument("--devices", default="all", help="'all' or comma-separated device ids")
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--samples", type=int, default=6250, help="training samples per device")
    r.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    r.add_argument("--codec", default="fp32", choices=("fp32", "fp16", "q8", "q4"))
    r.add_argument("--link-mbps", type=float, default=20.0)
    r.add_argument("--format", choices=FORMATS, default=None,
                   help="default: from --out's suffix, else md")
    r.add_argument("--out", default=None, metavar="PATH", help="default: stdout")
    r.add_argument("--catalog", action="append", default=[], metavar="DIR", help=cat_help)
    r.add_argument("--state", default=None, metavar="PATH", help="calibration file")
    r.add_argument("--no-measure", action="store_true",
                   help="skip measuring the edge model's peak training memory")
    r.add_argument("--onnx", action="append", default=[], metavar="PATH")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (CatalogError, ValueError, FileNotFoundError) as err:
        print(f"gkt-profile: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a measurement subprocess failed
        print(f"gkt-profile: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
