"""`gkt-edge`: run a device of a GKT federation; predict with the model it was given.

The device adopts the hub's run spec (classes, model, input size and normalization,
training settings); what it is given here stays on the device: its data, codec choice,
threads, precision, state dir and credentials.

Exit codes: 0 the hub finished the federation (or SIGTERM/SIGINT: state saved),
2 bad arguments or config, or a state dir saved under another run or device or in use by
another gkt-edge, 3 (with --new-run) the hub started another run: start again to join it,
4 cannot reach the broker, 5 the broker refused the credentials,
6 the hub refused the device for good, 7 the state dir's disk is full.
predict: 0 done (unreadable files are skipped), 1 no image could be read, 2 no usable model.
fetch-model: 0 stored, 1 none arrived in time. Options can come from `--config FILE` (TOML)
and GKT_EDGE_* variables; flags > environment > file > defaults.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from edge_runtime.device.exit_codes import (
    EXIT_AUTH,
    EXIT_BROKER,
    EXIT_DISK_FULL,
    EXIT_USAGE,
    NO_RESTART,
)
from edge_runtime.ops.config_file import (
    add_config_args,
    parse_or_report,
)
from edge_runtime.ops.logs import add_log_args, setup_logging
from edge_runtime.ops.service_unit import add_service_parser
from edge_runtime.ops.state_dir import (
    claim_for_device,
    disk_full_message,
    is_disk_full,
    lock_state_dir,
)
from edge_runtime.protocol.codecs import LOGITS_CODECS
from edge_runtime.protocol.limits import DEFAULT_MAX_PAYLOAD, max_packet_size, payload_size

ENV_PREFIX = "GKT_EDGE_"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gkt-edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join a hub and train rounds until it says stop")
    run.add_argument("--hub", required=True, metavar="URL",
                     help="broker: mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS")
    run.add_argument("--username", help="MQTT user (default: the device id when a password "
                                        "is given; `gkt-hub device add` prints it)")
    run.add_argument("--password", help="MQTT password (visible to `ps`: prefer --password-file)")
    run.add_argument("--password-file", metavar="PATH", help="file holding the MQTT password")
    run.add_argument("--ca-file", metavar="PATH",
                     help="CA certificate of an mqtts:// broker (default: the system's CAs)")
    run.add_argument("--device-id", required=True)
    run.add_argument("--round-key-file", metavar="PATH",
                     help="the hub's run key (round.key in its state dir): follow only round "
                          "announcements signed with it (a loopback broker without logins)")
    run.add_argument("--state-dir", default=None,
                     help="model and progress (default: ./gkt-edge-state/DEVICE_ID)")
    run.add_argument("--new-run", action="store_true",
                     help="when the hub runs another run than the state dir's, keep the old "
                          "run's files under STATE/runs/RUN_ID and join the new one (the "
                          "decoded images are kept); a device that sees the hub switch runs "
                          "exits 3, which the service restarts, to do so")
    run.add_argument("--codec", default=None,
                     help="feature codec fp32 | fp16 | q8 | q4 (default: the run's; must be "
                          "one the run allows)")
    run.add_argument("--data", metavar="PATH",
                     help="this device's own images: a folder with one subfolder per class, "
                          "or a path,label manifest (.csv or .jsonl) (docs/own-data.md); "
                          "labels are matched to the run's class names. Without it, a shard "
                          "of the run's academic dataset (benchmarks)")
    run.add_argument("--val-fraction", type=float, default=0.1,
                     help="with --data: images held out for the device's own accuracy")
    run.add_argument("--skip-unknown-labels", action="store_true",
                     help="with --data: leave out images whose label is not a run class "
                          "(counted as skipped) instead of refusing to start")
    bench = run.add_argument_group(
        "academic datasets (benchmarks: the hub's run spec names the dataset)")
    bench.add_argument("--dataset", default=None,
                       help="expected dataset; refused if the hub runs another (default: the "
                            "run's)")
    bench.add_argument("--data-root", default="data")
    bench.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA")
    bench.add_argument("--shard", type=int, default=0,
                       help="this device's part of the partition")
    bench.add_argument("--num-shards", type=int, default=1, help="devices in the partition")
    bench.add_argument("--seed", type=int, default=0,
                       help="partition seed, same on every device")
    run.add_argument("--refresh", default=None,
                     help="which feature maps to upload: full | freeze:W | drift:B | delta, "
                          "joined with + (default: the run's; docs/uplink.md)")
    run.add_argument("--logits-codec", default=None, choices=LOGITS_CODECS,
                     help="codec of the logits we upload (default: the run's)")
    run.add_argument("--max-payload", type=payload_size, default=DEFAULT_MAX_PAYLOAD,
                     help="largest message in bytes; the broker allows this + 4 KB")
    run.add_argument("--threads", type=int, default=0,
                     help="torch CPU threads (0 = torch's default: one per core)")
    run.add_argument("--extract-backend", default="folded",
                     help="folded | eager | onnxruntime (docs/performance.md)")
    run.add_argument("--precision", default="fp32",
                     help="fp32 | bf16 | auto: bf16 autocast, ~1.4x faster training and less "
                          "memory on CPUs with native bf16 (docs/performance.md)")
    run.add_argument("--no-local-eval", action="store_true",
                     help="do not evaluate the local classifier on the test split")
    run.add_argument("--mode", choices=("sync", "async"), default="sync",
                     help="async: go again as soon as this device's logits come (docs/async.md)")
    run.add_argument("--speed-factor", type=float, default=1.0,
                     help="simulate a device this many times slower than this machine")
    run.add_argument("--bandwidth", default="0",
                     help="simulate a link of this many bytes/s, e.g. 400K, 2M (0 = as is)")
    add_config_args(run, ENV_PREFIX)
    add_log_args(run)
    add_predict_parser(sub)
    fetch = sub.add_parser("fetch-model", help="ask the hub for this device's current model "
                                               "(stored in the state dir, for predict)")
    fetch.add_argument("--hub", required=True, metavar="URL")
    fetch.add_argument("--device-id", required=True)
    fetch.add_argument("--state-dir", default=None,
                       help="where models are kept (default: ./gkt-edge-state/DEVICE_ID)")
    for name in ("--username", "--password", "--password-file", "--ca-file"):
        fetch.add_argument(name, help="as for `gkt-edge run`")
    fetch.add_argument("--timeout", type=float, default=300.0,
                       help="seconds to wait (the hub may export the model first)")
    fetch.add_argument("--max-payload", type=payload_size, default=DEFAULT_MAX_PAYLOAD)
    add_log_args(fetch)
    add_service_parser(sub, "gkt-edge", "run")
    return p


def add_predict_parser(sub) -> None:
    pr = sub.add_parser("predict", help="classify images with the model the hub delivered "
                                        "(needs onnxruntime: the [predict] extra)")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--state-dir", help="a device state dir: its newest delivered model")
    src.add_argument("--model", metavar="FILE.onnx", help="an exported model file")
    pr.add_argument("paths", nargs="+", metavar="PATH",
                    help="image files, folders (recursive), or .csv/.txt manifests of "
                         "path[,label] lines")
    pr.add_argument("--int8", action="store_true",
                    help="with --state-dir: the int8 model (docs/predict.md: which to run)")
    pr.add_argument("--top-k", type=int, default=3, help="classes shown per image")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--json", metavar="OUT", help="write every prediction as JSON")
    pr.add_argument("--threads", type=int, default=0,
                    help="onnxruntime threads (0 = one per core)")
    pr.add_argument("-q", "--quiet", action="store_true",
                    help="only the summary line (and skipped files)")


def run_predict_command(args: argparse.Namespace) -> int:
    from edge_runtime.device.predict import ModelError, PredictConfig, describe, run_predict

    try:
        cfg = PredictConfig(tuple(args.paths), args.model, args.state_dir, args.int8,
                            args.top_k, args.batch_size, args.json, args.threads, args.quiet)
        model, summary = run_predict(cfg)
    except (ValueError, ModelError) as err:
        print(f"gkt-edge predict: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(describe(model, summary))
    if args.json:
        print(f"wrote {args.json}")
    return 0 if summary.predictions else 1


def run_fetch_command(args: argparse.Namespace) -> int:
    from edge_runtime.device.fetch import fetch_model
    from edge_runtime.mqtt.link import AuthRefusedError, LinkConfig, MqttLink
    from edge_runtime.protocol.topics import validate_device_id

    try:
        validate_device_id(args.device_id)
        link = MqttLink(LinkConfig(args.hub, client_id=f"gkt-edge-{args.device_id}-fetch",
                                   max_packet_size=max_packet_size(args.max_payload),
                                   **login_fields(args)))
    except (ValueError, OSError) as err:
        print(f"gkt-edge fetch-model: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        link.connect()
        state = state_dir_of(args)
        got = fetch_model(link, args.device_id, state, args.timeout,
                          max_packet_size(args.max_payload))
    except AuthRefusedError as err:
        print(f"gkt-edge fetch-model: error: {err}", file=sys.stderr)
        return EXIT_AUTH
    except ConnectionError as err:
        print(f"gkt-edge fetch-model: error: {err}", file=sys.stderr)
        return EXIT_BROKER
    finally:
        link.close()
    if not got:
        print(f"gkt-edge fetch-model: no model arrived within {args.timeout:g}s: the hub has "
              "none for this device until a round with its upload completed (or the hub "
              "runs without the [export] extra)", file=sys.stderr)
        return 1
    for variant, (rnd, path) in sorted(got.items()):
        print(f"round {rnd} {variant} model: {path}")
    return 0


def print_service(args: argparse.Namespace) -> int:
    from edge_runtime.ops.service_unit import print_unit

    return print_unit(args, build_parser(), "gkt-edge", "run",
                      "GKT edge device (gkt-edge run)", NO_RESTART, stop_timeout=90.0)


def state_dir_of(args: argparse.Namespace) -> Path:
    """--state-dir, else ./gkt-edge-state/DEVICE_ID."""
    return Path(args.state_dir or f"gkt-edge-state/{args.device_id}")


def login_fields(args: argparse.Namespace) -> dict:
    """LinkConfig fields for the credentials and CA options (ValueError/OSError if bad)."""
    if args.password and args.password_file:
        raise ValueError("give --password or --password-file, not both")
    password = args.password
    if args.password_file:
        with open(args.password_file) as f:
            password = f.read().strip()
        if not password:
            raise ValueError(f"--password-file {args.password_file} is empty")
    username = args.username or (args.device_id if password else None)
    return {"username": username, "password": password, "ca_file": args.ca_file}


def main(argv: list[str] | None = None) -> int:
    args = parse_or_report(build_parser(), argv, ENV_PREFIX)
    if args is None:
        return EXIT_USAGE
    if args.command == "service":
        return print_service(args)
    if args.command == "predict":
        return run_predict_command(args)
    setup_logging(args.log_format, args.log_level)
    if args.command == "fetch-model":
        return run_fetch_command(args)
    from edge_runtime.device.throttle import DeviceSpeed, parse_bandwidth
    from edge_runtime.mqtt.link import LinkConfig, MqttLink
    from edge_runtime.protocol.codecs import get_codec
    from edge_runtime.protocol.topics import validate_device_id

    try:
        validate_device_id(args.device_id)
        if not 0 <= args.shard < args.num_shards:
            raise ValueError(f"--shard {args.shard} must be in [0, --num-shards {args.num_shards})")
        if args.codec is not None:
            get_codec(args.codec)
        speed = DeviceSpeed(args.speed_factor, parse_bandwidth(args.bandwidth))
        link = MqttLink(LinkConfig(args.hub, client_id=f"gkt-edge-{args.device_id}",
                                   max_packet_size=max_packet_size(args.max_payload),
                                   **login_fields(args)))
    except (ValueError, OSError) as err:
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    state_dir = state_dir_of(args)
    lock = None
    try:  # one process per state dir, and one device's dir is not another's
        lock = lock_state_dir(state_dir, "gkt-edge run")
        claim_for_device(state_dir, args.device_id)
    except (ValueError, OSError) as err:
        if lock is not None:
            lock.close()
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_device(args, link, speed)
    finally:
        lock.close()


def run_device(args: argparse.Namespace, link, speed) -> int:
    """`gkt-edge run` once its arguments are valid and its state dir is ours."""
    from edge_runtime.device.adopt import RunSpecWatch
    from edge_runtime.device.edge_device import DeviceStateError
    from edge_runtime.mqtt.link import AuthRefusedError

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    stopping = threading.Event()
    agent = None

    def on_signal(signum: int, _frame) -> None:
        logging.getLogger("gkt.edge").info("%s: %s, stopping (progress is saved after each "
                                           "round)", args.device_id,
                                           signal.Signals(signum).name)
        stopping.set()
        if agent is not None:
            agent.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        link.connect()
    except AuthRefusedError as err:
        print(f"gkt-edge: error: {err}; check --username/--password, or re-enrol the device "
              "(gkt-hub device add)", file=sys.stderr)
        return EXIT_AUTH
    except ConnectionError as err:
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_BROKER
    try:
        watch = RunSpecWatch(link)
        watch.start()
        spec = watch.wait(stopping)
        if spec is None:
            return 0
        try:
            agent = build_agent(args, link, watch, speed)
        except (ValueError, FileNotFoundError) as err:  # DeviceStateError, OwnDataError
            print(f"gkt-edge: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        if stopping.is_set():
            return 0
        return agent.run()
    except DeviceStateError as err:  # a restart would fail the same way
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:
        if not is_disk_full(err):
            raise
        print("gkt-edge: error: " + disk_full_message(
            err, state_dir_of(args), "Free space, then start the device again: it resumes "
            "from its last saved round"), file=sys.stderr)
        return EXIT_DISK_FULL
    finally:
        link.close()


def build_agent(args: argparse.Namespace, link, watch, speed):
    """The device for the adopted run spec: its data, model and state dir (ValueError,
    FileNotFoundError or RunSpecMismatch name what is wrong: exit 2)."""
    from edge_runtime.device.adopt import adopt_state_dir, edge_config, pick_codec
    from edge_runtime.device.agent import AgentConfig, EdgeAgent
    from edge_runtime.learning.own_data import DataSpec
    from edge_runtime.learning.preprocess import preprocess_of
    from edge_runtime.protocol.round_auth import read_key

    spec = watch.spec
    codec, refresh = pick_codec(spec, args.codec), args.refresh or spec.refresh
    logits_codec = args.logits_codec or spec.logits_codec
    logging.getLogger("gkt.edge").info(
        "%s: adopted run %s (%d classes, input %d, %d local epochs, lr %g, codec %s, "
        "refresh %s, logits %s)", args.device_id, spec.run_id, spec.num_classes,
        spec.preprocess["size"], spec.epochs, spec.lr, codec, refresh, logits_codec)
    state_dir = state_dir_of(args)
    cfg = AgentConfig(args.device_id, codec=codec,
                      state_dir=str(state_dir), max_payload=args.max_payload,
                      upload_deadline=spec.upload_deadline, mode=args.mode, speed=speed,
                      run_id=spec.run_id, refresh=refresh, logits_codec=logits_codec,
                      send_logits=spec.device_logits, new_run=args.new_run,
                      round_key=read_key(args.round_key_file) if args.round_key_file else None)
    edge_cfg = edge_config(spec, args.extract_backend, args.precision)
    adopt_state_dir(state_dir, spec, new_run=args.new_run)
    own, test_loader = None, None
    if args.data:
        device, own = own_data_device(args, DataSpec(spec.classes, preprocess_of(spec)),
                                      edge_cfg, str(state_dir), spec.model_seed)
    else:
        device, test_loader = academic_device(args, spec, edge_cfg)
    return EdgeAgent(link, device, cfg, test_loader, own_data=own, spec_watch=watch)


def own_data_device(args: argparse.Namespace, spec, edge_cfg, state_dir: str,
                    model_seed: int):
    """(device, its data source) for the device's own images (--data) under the run's
    ``spec`` (a ``DataSpec``), scanned once now (OwnDataError if nothing is usable)."""
    from edge_runtime.device.adopt import CATALOG_FILE
    from edge_runtime.device.edge_device import EdgeDevice
    from edge_runtime.device.own_data_source import OwnDataSource
    from edge_runtime.learning.catalog import ImageCatalog
    from edge_runtime.learning.own_data import OwnData, OwnDataConfig

    if args.num_shards != 1 or args.shard != 0:
        raise ValueError("--data is this device's whole training set: drop --shard and "
                         "--num-shards (they split an academic --dataset)")
    cfg = OwnDataConfig(args.data, spec, args.val_fraction, args.skip_unknown_labels)
    own = OwnDataSource(OwnData(cfg, ImageCatalog(Path(state_dir) / CATALOG_FILE)))
    train, train_eval, ids, positions = own.device_args()
    device = EdgeDevice(args.device_id, train, train_eval, ids, len(cfg.spec.classes),
                        edge_cfg, seed=args.seed, model_seed=model_seed,
                        positions=positions, ids_may_change=True)
    return device, own


def academic_device(args: argparse.Namespace, spec, edge_cfg):
    """(device, test loader) for shard --shard of --num-shards of the run's dataset."""
    from edge_runtime.device.edge_device import EdgeDevice
    from edge_runtime.learning.data import DataConfig, load_split, make_loader
    from edge_runtime.learning.dataset_classes import dataset_classes
    from edge_runtime.learning.partition import partition

    if spec.dataset is None:
        raise ValueError(f"run {spec.run_id} trains on the devices' own images (classes "
                         f"{', '.join(spec.classes[:10])}): give --data PATH")
    if args.dataset not in (None, spec.dataset):
        raise ValueError(f"--dataset {args.dataset}: the hub's run {spec.run_id} uses "
                         f"{spec.dataset}")
    if dataset_classes(spec.dataset) != spec.classes:
        raise ValueError(f"run {spec.run_id} names classes {list(spec.classes)[:10]} for "
                         f"{spec.dataset}, whose classes are "
                         f"{list(dataset_classes(spec.dataset))[:10]}")
    size = spec.preprocess["size"]
    data = DataConfig(spec.dataset, args.data_root, size)
    plain = DataConfig(spec.dataset, args.data_root, size, augment=False)
    train, train_eval = load_split(data, True), load_split(plain, True)
    ids = partition(train.targets, args.num_shards, args.partition, args.seed)[args.shard]
    test_loader = None
    if not args.no_local_eval:
        test_loader = make_loader(load_split(plain, False).dataset, 256, shuffle=False)
    device = EdgeDevice(args.device_id, train, train_eval, ids, spec.num_classes, edge_cfg,
                        seed=args.seed + args.shard, model_seed=spec.model_seed)
    return device, test_loader


if __name__ == "__main__":
    sys.exit(main())
