"""`gkt-edge`: run a device of a GKT federation.

Exit codes: 0 the hub finished the federation (or SIGTERM/SIGINT: state saved),
2 bad arguments or config, 4 cannot reach the broker. Options can come from
`--config FILE` (TOML) and GKT_EDGE_* variables; flags > environment > file > defaults.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from edge_runtime.device.exit_codes import EXIT_AUTH, EXIT_BROKER, EXIT_USAGE, NO_RESTART
from edge_runtime.device.refresh import DEFAULT_POLICY
from edge_runtime.ops.config_file import (
    ConfigError,
    add_config_args,
    parse_args,
)
from edge_runtime.ops.logs import add_log_args, setup_logging
from edge_runtime.ops.service_unit import add_service_parser
from edge_runtime.protocol.limits import DEFAULT_MAX_PAYLOAD, max_packet_size
from edge_runtime.protocol.messages import LOGITS_CODEC, LOGITS_CODECS

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
    run.add_argument("--state-dir", default=None,
                     help="model and progress (default: ./gkt-edge-state/DEVICE_ID)")
    run.add_argument("--codec", default="q8", help="feature codec: fp32 | fp16 | q8 | q4")
    run.add_argument("--refresh", default=DEFAULT_POLICY,
                     help="which feature maps to upload: full | freeze:W | drift:B | delta, "
                          f"joined with + (default {DEFAULT_POLICY}; docs/uplink.md)")
    run.add_argument("--logits-codec", default=LOGITS_CODEC, choices=LOGITS_CODECS,
                     help="codec of the logits we upload")
    run.add_argument("--dataset", default="digits")
    run.add_argument("--data-root", default="data")
    run.add_argument("--image-size", type=int, default=0)
    run.add_argument("--partition", default="dirichlet:0.5", help="iid | dirichlet:ALPHA")
    run.add_argument("--shard", type=int, default=0, help="this device's part of the partition")
    run.add_argument("--num-shards", type=int, default=1, help="devices in the partition")
    run.add_argument("--seed", type=int, default=0, help="partition seed, same on every device")
    run.add_argument("--model-seed", type=int, default=0,
                     help="initial weights; must be the same on every device")
    run.add_argument("--edge-epochs", type=int, default=1, help="local epochs per round (E_c)")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--edge-lr", type=float, default=1e-3)
    run.add_argument("--temperature", type=float, default=3.0)
    run.add_argument("--alpha", type=float, default=1.0)
    run.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD,
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
    add_service_parser(sub, "gkt-edge", "run")
    return p


def print_service(args: argparse.Namespace) -> int:
    from edge_runtime.ops.service_unit import print_unit

    return print_unit(args, build_parser(), "gkt-edge", "run",
                      "GKT edge device (gkt-edge run)", NO_RESTART, stop_timeout=90.0)


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
    try:
        args = parse_args(build_parser(), argv, ENV_PREFIX)
    except ConfigError as err:
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "service":
        return print_service(args)
    setup_logging(args.log_format, args.log_level)
    from edge_runtime.device.agent import AgentConfig, EdgeAgent
    from edge_runtime.device.edge_device import DeviceStateError, EdgeDevice
    from edge_runtime.learning.data import DataConfig, load_split, make_loader
    from edge_runtime.learning.partition import partition
    from edge_runtime.learning.train import EdgeTrainConfig
    from edge_runtime.mqtt.link import AuthRefusedError, LinkConfig, MqttLink
    from edge_runtime.protocol.topics import validate_device_id

    try:
        validate_device_id(args.device_id)
        if not 0 <= args.shard < args.num_shards:
            raise ValueError(f"--shard {args.shard} must be in [0, --num-shards {args.num_shards})")
        data = DataConfig(args.dataset, args.data_root, args.image_size)
        plain = DataConfig(args.dataset, args.data_root, args.image_size, augment=False)
        train, train_eval = load_split(data, True), load_split(plain, True)
        ids = partition(train.targets, args.num_shards, args.partition, args.seed)[args.shard]
        test_loader = None
        if not args.no_local_eval:
            test_loader = make_loader(load_split(plain, False).dataset, 256, shuffle=False)
        from edge_runtime.device.throttle import DeviceSpeed, parse_bandwidth

        cfg = AgentConfig(args.device_id, codec=args.codec,
                          state_dir=args.state_dir or f"gkt-edge-state/{args.device_id}",
                          max_payload=args.max_payload, mode=args.mode,
                          refresh=args.refresh, logits_codec=args.logits_codec,
                          speed=DeviceSpeed(args.speed_factor, parse_bandwidth(args.bandwidth)))
        from edge_runtime.protocol.codecs import get_codec

        get_codec(cfg.codec)
        edge_cfg = EdgeTrainConfig(args.edge_epochs, args.batch_size, args.edge_lr,
                                   temperature=args.temperature, alpha=args.alpha,
                                   extract_backend=args.extract_backend,
                                   precision=args.precision)
    except (ValueError, FileNotFoundError) as err:
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    device = EdgeDevice(args.device_id, train, train_eval, ids, data.num_classes, edge_cfg,
                        seed=args.seed + args.shard, model_seed=args.model_seed)
    try:
        link = MqttLink(LinkConfig(args.hub, client_id=f"gkt-edge-{args.device_id}",
                                   max_packet_size=max_packet_size(cfg.max_payload),
                                   **login_fields(args)))
    except (ValueError, OSError) as err:
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        link.connect()
    except AuthRefusedError as err:
        print(f"gkt-edge: error: {err}; check --username/--password, or re-enrol the device "
              "(gkt-hub device add)", file=sys.stderr)
        return EXIT_AUTH
    except ConnectionError as err:
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_BROKER
    agent = EdgeAgent(link, device, cfg, test_loader)

    def on_signal(signum: int, _frame) -> None:
        logging.getLogger("gkt.edge").info("%s: %s, stopping (progress is saved after each "
                                           "round)", args.device_id,
                                           signal.Signals(signum).name)
        agent.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        return agent.run()
    except DeviceStateError as err:  # a restart would fail the same way
        print(f"gkt-edge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
