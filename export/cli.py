"""``gkt-export``: a hub checkpoint (and device states) -> verified ONNX graphs.

Exit codes: 0 every graph verified; 1 a verification check failed (see the table / JSON;
the graph is left as ``*.failed.onnx``); 2 bad arguments or inputs; 3 the exporter failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the runtime import is deferred so a missing extra gives a clear message
    from export.report import ExportReport

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_EXPORT = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gkt-export",
        description="Export a GKT hub checkpoint to ONNX (edge, extractor, server and composed "
                    "graphs), verify every graph against PyTorch with onnxruntime on the test "
                    "set, optionally quantize to int8.")
    p.add_argument("checkpoint", help="a hub checkpoint: round folder, hub state dir, or its "
                                      "checkpoints/ folder (the newest round is used)")
    p.add_argument("--out", required=True, help="output folder for the .onnx files")
    p.add_argument("--device", action="append", default=[], metavar="NAME",
                   help="export extractor_NAME and composed_NAME (repeatable; default: every "
                        "device in the checkpoint)")
    p.add_argument("--edge-state", action="append", default=[], metavar="DIR",
                   help="a device state dir (edge.safetensors): export its edge model "
                        "(repeatable)")
    p.add_argument("--opset", type=int, default=18,
                   help="ONNX opset (default 18; use 13 for JetPack 4 / TensorRT 8 / old "
                        "onnxruntime). >= 18: dynamo exporter, below: TorchScript exporter")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")
    p.add_argument("--quantize", choices=("int8",), help="also write int8 static QDQ graphs "
                                                         "of the edge and composed models")
    p.add_argument("--calibration-samples", type=int, default=512,
                   help="training samples to calibrate int8 on (default 512)")
    p.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"),
                   default="minmax")
    p.add_argument("--int8-activations", choices=("uint8", "int8"), default="uint8",
                   help="uint8 (default): fastest in onnxruntime on x86 and ARM; int8: "
                        "symmetric, what TensorRT requires")
    p.add_argument("--max-int8-drop", type=float, default=1.0, metavar="POINTS",
                   help="fail if int8 top-1 accuracy is more than this many points below fp32")
    p.add_argument("--test-samples", type=int, default=0,
                   help="verify on the first N test samples (default 0: all of them)")
    p.add_argument("--rtol", type=float, default=1e-4, help="parity tolerance (default 1e-4)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="parity tolerance (default 1e-4), on outputs scaled by max(1, max |out|) "
                        "per sample; see docs/export.md")
    p.add_argument("--data-root", default="data", help="root of torchvision datasets")
    p.add_argument("--test-data", metavar="DIR",
                   help="for a run on devices' own data: the hub's held-out folder (one "
                        "subfolder per class) to verify on and calibrate int8 with")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for PyTorch and onnxruntime (default 1)")
    p.add_argument("--latency-runs", type=int, default=20, help="timed runs per median")
    p.add_argument("--json", metavar="PATH", help="write what was exported and its figures")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress log")
    return p


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: ExportReport) -> str:
    rows = [("graph", "opset", "max|diff|", "acc torch", "acc onnx", "acc int8",
             "ms b1", "ms b1 int8", "ms b64", "ms b64 int8", "status")]
    for g in report.graphs:
        q = g.int8
        lat8 = q.latency_ms if q else {}
        status = "FAILED" if g.error or (q and q.error) else "ok"
        rows.append((
            g.name, str(g.opset), _fmt(g.parity.max_abs_diff if g.parity else None, ".1e"),
            _fmt(g.accuracy_torch, ".4f"), _fmt(g.accuracy_onnx, ".4f"),
            _fmt(q.accuracy_int8 if q else None, ".4f"),
            _fmt(g.latency_ms.get("1"), ".3f"), _fmt(lat8.get("1"), ".3f"),
            _fmt(g.latency_ms.get("64"), ".2f"), _fmt(lat8.get("64"), ".2f"), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # only our own progress at INFO: the exporters log every optimization pass
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: "
                                                      "%(message)s")
    logging.getLogger("gkt").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        import torch

        from export.onnx_export import ExportError, ExportOptions
        from export.pipeline import ExportConfig, run_export
        from export.quantize import QuantConfig
    except ModuleNotFoundError as err:
        print(f"gkt-export: {err.name} is missing; install the export extra: "
              f"pip install 'gkt-edge-toolkit[export]'", file=sys.stderr)
        return EXIT_USAGE
    torch.set_num_threads(args.threads)
    try:
        cfg = ExportConfig(
            checkpoint=args.checkpoint, out_dir=args.out, devices=tuple(args.device),
            edge_states=tuple(args.edge_state), data_root=args.data_root,
            test_data=args.test_data,
            export=ExportOptions(args.opset, args.exporter), quantize=args.quantize,
            quant=QuantConfig(args.calibration_samples, args.calibration_method,
                              args.int8_activations),
            max_int8_drop=args.max_int8_drop / 100, test_samples=args.test_samples,
            threads=args.threads, latency_runs=args.latency_runs, rtol=args.rtol,
            atol=args.atol)
        report = run_export(cfg)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"gkt-export: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ExportError as err:
        print(f"gkt-export: export failed: {err}", file=sys.stderr)
        return EXIT_EXPORT
    print(f"checkpoint {report.checkpoint} (round {report.round}, {report.dataset}, "
          f"{report.test_samples} test samples, {report.threads} thread(s), opset "
          f"{report.opset} via {report.exporter})")
    print(format_table(report))
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    if not report.passed:
        for err in report.errors:
            print(f"gkt-export: verification failed: {err}", file=sys.stderr)
        return EXIT_VERIFY
    print(f"all {len(report.graphs)} graphs verified; written to {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
