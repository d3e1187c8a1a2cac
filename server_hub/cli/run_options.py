"""The run spec on the `gkt-hub` command line: classes, input, normalization, held-out data.

Own data: `--classes a,b,c`, `--classes-from DIR` or `--test-data DIR` (its subfolders are
the classes unless one of the others is given; simulate: also `--split-data DIR`, or the
union of the `--device-data` folders' subfolders). Normalization: `--mean`/`--std`, else
measured on `--test-data`, else 0.5/0.25 per channel. Without any of these the run is an
academic benchmark (`--dataset`), and the spec carries that dataset's class names.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from edge_runtime.learning.preprocess import RESIZE_METHODS, Preprocess
from edge_runtime.protocol.codecs import FEATURE_CODEC, FEATURE_CODECS, LOGITS_CODEC, LOGITS_CODECS
from edge_runtime.protocol.refresh_policy import DEFAULT_POLICY
from server_hub.run.plan import RunPlan, build_spec, dataset_plan
from server_hub.run.test_data import channel_stats, class_folders, read_test_folder
from server_hub.simulation.inproc import FederationConfig

OWN_DATA_SIZE = 32  # input size of own images unless --image-size says otherwise


def add_run_args(p: argparse.ArgumentParser, serve: bool) -> None:
    g = p.add_argument_group("the run devices adopt (docs/own-data.md)")
    g.add_argument("--classes", metavar="A,B,C",
                   help="class names in label order; devices' folders are matched by name")
    g.add_argument("--classes-from", metavar="DIR",
                   help="class names: the subfolders of DIR, sorted")
    g.add_argument("--test-data", metavar="DIR",
                   help="held-out images, one subfolder per class: the hub evaluates on them "
                        "(per-class accuracy, confusion matrix) and measures the "
                        "normalization on them")
    g.add_argument("--mean", metavar="R,G,B", help="normalization mean (default: measured on "
                                                   "--test-data, else 0.5,0.5,0.5)")
    g.add_argument("--std", metavar="R,G,B", help="normalization std (default: measured on "
                                                  "--test-data, else 0.25,0.25,0.25)")
    g.add_argument("--resize", choices=RESIZE_METHODS, default="center_crop",
                   help="how images of another shape become squares")
    if serve:
        g.add_argument("--codec", default=FEATURE_CODEC, choices=FEATURE_CODECS,
                       help="feature codec devices use unless they pick another allowed one")
    g.add_argument("--codecs", default=",".join(FEATURE_CODECS), metavar="C,C",
                   help="codecs devices may choose (--codec on gkt-edge)")
    g.add_argument("--refresh", default=DEFAULT_POLICY,
                   help="which feature maps devices upload: full | freeze:W | drift:B | "
                        f"delta, joined with + (default {DEFAULT_POLICY}; docs/uplink.md)")
    g.add_argument("--logits-codec", default=LOGITS_CODEC, choices=LOGITS_CODECS,
                   help=f"codec of the logits, both ways (default {LOGITS_CODEC})")
    g.add_argument("--upload-deadline", type=float, default=600.0,
                   help="seconds a device keeps resending one upload")


def _triple(text: str, flag: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ValueError(f"{flag} {text!r}: give one number or three (R,G,B)")
    return vals  # type: ignore[return-value]


def _classes(args: argparse.Namespace) -> tuple[str, ...] | None:
    if args.classes and args.classes_from:
        raise ValueError("give --classes or --classes-from, not both")
    if args.classes:
        return tuple(c.strip() for c in args.classes.split(",") if c.strip())
    folder = args.classes_from or args.test_data or getattr(args, "split_data", None)
    if folder:
        return tuple(class_folders(folder))
    if getattr(args, "device_data", None):
        from server_hub.simulation.own_folders import folder_classes

        return folder_classes(args.device_data)
    return None


def plan_run(args: argparse.Namespace, cfg: FederationConfig, codec: str,
             round_deadline: float) -> RunPlan:
    """The run spec from the command line (ValueError names a bad option)."""
    classes = _classes(args)
    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip())
    if classes is None:  # an academic benchmark
        if args.mean or args.std:
            raise ValueError("--mean/--std are for own data (--classes or --test-data); "
                             f"{cfg.data.dataset} has its own normalization")
        return dataset_plan(cfg, codec, round_deadline, codecs=codecs,
                            upload_deadline=args.upload_deadline)
    size = cfg.data.image_size or OWN_DATA_SIZE
    pre = Preprocess(size, resize=args.resize)
    test = None
    if args.test_data:
        print(f"reading the held-out images in {args.test_data} ...", flush=True)
        test = read_test_folder(args.test_data, classes, pre)
        mean, std = channel_stats(test.images)
        print(f"{len(test.labels)} held-out images in {len(classes)} classes; measured "
              f"mean {mean}, std {std}", flush=True)
    else:
        mean, std = pre.mean, pre.std
    pre = Preprocess(size, _triple(args.mean, "--mean") if args.mean else mean,
                     _triple(args.std, "--std") if args.std else std, args.resize)
    return RunPlan(build_spec(cfg, classes, pre, None, codec, codecs, round_deadline,
                              args.upload_deadline), test, args.test_data or None)


def add_split_parser(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("split-data", help="split one image folder into per-device folders "
                                           "(links) for lab trials")
    sp.add_argument("source", help="a folder with one subfolder per class")
    sp.add_argument("dest", help="a new (or empty) folder; gets device-0, device-1, ... and "
                                 "split.json")
    sp.add_argument("--devices", type=int, required=True)
    sp.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA (per class)")
    sp.add_argument("--seed", type=int, default=0)


def run_split(args: argparse.Namespace) -> int:
    from edge_runtime.learning.image_folders import split_folder

    try:
        folders = split_folder(args.source, args.dest, args.devices, args.partition, args.seed)
    except (ValueError, OSError) as err:  # FileNotFoundError, FileExistsError included
        print(f"gkt-hub: error: {err}", file=sys.stderr)
        return 2
    report = json.loads((Path(args.dest) / "split.json").read_text())
    for row in report["devices"]:
        print(f"{row['folder']}: {row['files']} files")
    print(f"wrote {len(folders)} device folders under {args.dest} (split.json records the "
          "split); on device k: gkt-edge run --data " + str(Path(args.dest) / "device-K"))
    return 0


def prepare_device_data(args: argparse.Namespace) -> None:
    """`simulate --split-data`: split into STATE/device-data first; then the device count
    is the number of --device-data folders (ValueError names a bad combination)."""
    if args.split_data and args.device_data:
        raise ValueError("give --split-data or --device-data, not both")
    if args.split_data:
        from edge_runtime.learning.image_folders import split_folder

        if not args.state_dir:
            args.state_dir = tempfile.mkdtemp(prefix="gkt-sim-")
        dest = Path(args.state_dir) / "device-data"
        if dest.exists():  # a rerun with the same state dir: the same split
            shutil.rmtree(dest)
        folders = split_folder(args.split_data, dest, args.devices, args.partition, args.seed)
        print(f"split {args.split_data} into {len(folders)} device folders under {dest} "
              f"({args.partition}, seed {args.seed})", flush=True)
        args.device_data = [str(f) for f in folders]
    if args.device_data:
        args.devices = len(args.device_data)
