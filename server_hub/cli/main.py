"""`gkt-hub`: serve a federation, or simulate one on this machine."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from edge_runtime.learning.data import DATASETS, DataConfig
from edge_runtime.learning.train import EdgeTrainConfig
from edge_runtime.ops.config_file import (
    add_config_args,
    parse_or_report,
)
from edge_runtime.ops.logs import add_log_args, setup_logging
from edge_runtime.ops.service_unit import add_service_parser, print_unit
from edge_runtime.protocol.codecs import FEATURE_CODEC, FEATURE_CODECS, LOGITS_CODEC
from edge_runtime.protocol.limits import DEFAULT_MAX_PAYLOAD, payload_size
from edge_runtime.protocol.refresh_policy import DEFAULT_POLICY
from server_hub.assembly.exit_codes import (
    EXIT_BAD_ARGS,
    EXIT_DISK_FULL,
    EXIT_INTERRUPTED,
    EXIT_OK,
)
from server_hub.assembly.options import (
    BrokerOptions,
    HubOptions,
    ModeOptions,
    MonitorOptions,
    WorkerOptions,
)
from server_hub.cli.device import add_access_args, add_device_parser, run_device
from server_hub.cli.feature_args import (
    add_monitoring_args,
    add_status_parser,
    add_worker_args,
    run_status,
)
from server_hub.cli.mode_options import add_async_args, mode_options
from server_hub.cli.run_options import (
    add_run_args,
    add_split_parser,
    plan_run,
    prepare_device_data,
    run_split,
)
from server_hub.models import SERVER_MODELS
from server_hub.run.plan import RunPlan
from server_hub.service import ServiceConfig
from server_hub.simulation.inproc import ALGORITHMS, FederationConfig
from server_hub.trainer import ServerTrainConfig

ENV_PREFIX = "GKT_HUB_"  # GKT_HUB_ROUNDS=50 is --rounds 50 (flags > environment > --config)


def add_training_args(p: argparse.ArgumentParser, simulate: bool = False) -> None:
    """Data and training flags; the edge ones have gkt-edge's names and defaults."""
    g = p.add_argument_group("data and training")
    g.add_argument("--dataset", choices=DATASETS, default="digits")
    g.add_argument("--data-root", default="data", help="local root of torchvision datasets")
    g.add_argument("--image-size", type=int, default=0,
                   help="input size; 0 = native (32; digits 8)")
    if simulate:  # serve's devices split their data themselves (gkt-edge --partition)
        g.add_argument("--partition", default="dirichlet:0.5", help="iid | dirichlet:ALPHA")
    g.add_argument("--rounds", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--edge-epochs", type=int, default=1, help="local epochs per round (E_c)")
    g.add_argument("--edge-lr", type=float, default=1e-3)
    g.add_argument("--server-model", choices=sorted(SERVER_MODELS), default="resnet55")
    g.add_argument("--server-epochs", type=int, default=3, help="hub epochs per round (E_s)")
    g.add_argument("--server-lr", type=float, default=1e-3)
    g.add_argument("--temperature", type=float, default=3.0)
    g.add_argument("--alpha", type=float, default=1.0, help="weight of KD on the devices")
    g.add_argument("--server-alpha", type=float, default=0.0,
                   help="weight of KD from device logits on the hub (0 = CE only)")
    g.add_argument("--device", default="auto", help="hub torch device: auto | cpu | cuda")


def federation_config(args: argparse.Namespace) -> FederationConfig:
    return FederationConfig(
        state_dir=getattr(args, "state_dir", None),
        codec=getattr(args, "codec", FEATURE_CODEC),
        refresh=getattr(args, "refresh", DEFAULT_POLICY),
        logits_codec=getattr(args, "logits_codec", LOGITS_CODEC),
        data=DataConfig(args.dataset, args.data_root, args.image_size),
        devices=args.devices,
        partition=getattr(args, "partition", FederationConfig.partition),
        rounds=args.rounds,
        seed=args.seed,
        edge=EdgeTrainConfig(args.edge_epochs, args.batch_size, args.edge_lr,
                             temperature=args.temperature, alpha=args.alpha),
        server=ServerTrainConfig(args.server_model, args.server_epochs, args.batch_size,
                                 args.server_lr, temperature=args.temperature,
                                 alpha=args.server_alpha, device=args.device),
    )


def monitor_options(args: argparse.Namespace) -> MonitorOptions:
    return MonitorOptions(args.metrics_port, args.metrics_host, args.status_port,
                          args.status_host, args.monitor_linger)


def hub_options(args: argparse.Namespace) -> tuple[FederationConfig, HubOptions, BrokerOptions]:
    """`gkt-hub serve`'s typed options (also the torchrun entry's); ValueError names a bad
    option."""
    fed = federation_config(args)
    service = ServiceConfig(args.state_dir, rounds=fed.rounds, min_devices=args.min_devices,
                            round_deadline=args.round_deadline,
                            start_timeout=args.start_timeout,
                            max_payload=args.max_payload)
    workers = WorkerOptions(args.workers, args.share_group, args.worker_threads, args.trace_dir)
    opts = HubOptions(service, mode_options(args, args.min_devices, fed.rounds),
                      monitor_options(args), workers, progress=not args.no_progress,
                      deliver_models=not args.no_model_delivery, new_run=args.new_run,
                      plan=plan_run(args, fed, args.codec, args.round_deadline))
    user = args.broker_user
    broker = BrokerOptions(args.broker, user,
                           os.environ.get("GKT_BROKER_PASSWORD") if user else None,
                           args.listen, args.port, args.tls, args.tls_port,
                           tuple(args.tls_host), args.insecure)
    return fed, opts, broker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gkt-hub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="coordinate a federation of real devices")
    srv.add_argument("--broker", metavar="URL",
                     help="join this broker (mqtt[s]://HOST:PORT); default: start Mosquitto")
    srv.add_argument("--listen", default="127.0.0.1",
                     help="address of the managed broker (0.0.0.0 for devices on the network)")
    srv.add_argument("--port", type=int, default=1883, help="port of the managed broker")
    srv.add_argument("--state-dir", required=True,
                     help="checkpoints, broker config and data; a restart resumes from it")
    srv.add_argument("--new-run", action="store_true",
                     help="start a new run in --state-dir: the last run's checkpoints, "
                          "features, models and results move to STATE/runs/RUN_ID; enrolled "
                          "devices, TLS files and the broker stay (devices join with "
                          "gkt-edge run --new-run)")
    srv.add_argument("--min-devices", type=int, default=1)
    srv.add_argument("--round-deadline", type=float, default=300.0,
                     help="seconds a round waits for uploads before going on without a device")
    srv.add_argument("--start-timeout", type=float, default=3600.0,
                     help="seconds to wait for the first --min-devices devices")
    srv.add_argument("--max-payload", type=payload_size, default=DEFAULT_MAX_PAYLOAD,
                     help="largest message in bytes; the broker allows this + 4 KB")
    srv.add_argument("--no-progress", action="store_true")
    srv.add_argument("--no-model-delivery", action="store_true",
                     help="do not send devices their composed model (ONNX) at the end")
    add_access_args(srv)
    add_worker_args(srv)
    add_async_args(srv)
    srv.set_defaults(devices=1)
    add_training_args(srv)

    sim = sub.add_parser("simulate", help="run a whole federation on this machine")
    sim.add_argument("--transport", choices=("mqtt", "inproc"), default="mqtt",
                     help="mqtt: broker + hub + one gkt-edge process per device (default); "
                          "inproc: everything in this process")
    sim.add_argument("--codec", default=FEATURE_CODEC, choices=FEATURE_CODECS,
                     help="device feature codec")
    sim.add_argument("--round-deadline", type=float, default=300.0)
    sim.add_argument("--algorithm", choices=ALGORITHMS, default="gkt")
    sim.add_argument("--devices", type=int, default=4)
    own = sim.add_argument_group("devices' own image folders (docs/own-data.md)")
    own.add_argument("--device-data", action="append", metavar="DIR",
                     help="one device's image folder (repeat once per device; the device "
                          "count follows): each gkt-edge process runs with --data DIR")
    own.add_argument("--split-data", metavar="DIR",
                     help="split DIR (one subfolder per class) into --devices folders of "
                          "links by --partition first (as `gkt-hub split-data`), then run "
                          "them as --device-data")
    sim.add_argument("--json", metavar="PATH", help="write the run's results as JSON")
    sim.add_argument("--state-dir", help="hub checkpoints, device states, broker and logs "
                                         "(default: a new temporary folder)")
    sim.add_argument("--no-progress", action="store_true")
    sim.add_argument("--no-model-delivery", action="store_true",
                     help="do not send devices their composed model (ONNX) at the end")
    add_async_args(sim, simulate=True)
    add_training_args(sim, simulate=True)
    add_run_args(srv, serve=True)
    add_run_args(sim, serve=False)
    add_monitoring_args(srv)
    add_monitoring_args(sim)
    for p in (srv, sim):
        add_config_args(p, ENV_PREFIX)
        add_log_args(p)
    add_status_parser(sub)
    add_split_parser(sub)
    add_device_parser(sub)
    add_service_parser(sub, "gkt-hub", "serve")
    return parser


def print_service(args: argparse.Namespace) -> int:
    # 2 (bad arguments) and 5 (disk full) need a person; 3 (no devices yet) and 4 (broker)
    # are worth a retry.
    return print_unit(args, build_parser(), "gkt-hub", "serve", "GKT hub (gkt-hub serve)",
                      (EXIT_BAD_ARGS, EXIT_DISK_FULL), stop_timeout=300.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_or_report(build_parser(), argv, ENV_PREFIX)
    if args is None:
        return EXIT_BAD_ARGS
    if args.command == "status":
        return run_status(args)
    if args.command == "service":
        return print_service(args)
    if hasattr(args, "log_format"):
        setup_logging(args.log_format, args.log_level)
        args.no_progress = args.no_progress or args.log_format == "json"  # keep lines JSON
    else:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "device":
        return run_device(args)
    if args.command == "split-data":
        return run_split(args)
    try:
        if args.command == "serve":
            fed, opts, broker = hub_options(args)
        else:
            prepare_device_data(args)  # --split-data, --device-data: the device count
            cfg = federation_config(args)
            opts = mode_options(args, cfg.devices, cfg.rounds)
            # what every device adopts (a hub state dir keeps its run id: assembly/)
            plan = plan_run(args, cfg, args.codec, args.round_deadline)
    except (ValueError, OSError) as err:  # OSError: a --split-data/--test-data folder
        print(f"gkt-hub: error: {err}", file=sys.stderr)
        return EXIT_BAD_ARGS
    if args.command == "serve":
        from server_hub.cli.serve import serve

        try:
            return serve(fed, opts, broker)
        except KeyboardInterrupt:  # Ctrl-C at start-up, or a second one (the first stops cleanly)
            print("\ngkt-hub: stopped at once by Ctrl-C; a restart resumes after the last "
                  "checkpoint", file=sys.stderr)
            return EXIT_INTERRUPTED
    try:
        return simulate(args, cfg, opts, plan)
    except KeyboardInterrupt:
        print("\ngkt-hub: simulate stopped by Ctrl-C, with its device processes and broker; "
              "its state dir keeps the last completed round", file=sys.stderr)
        return EXIT_INTERRUPTED


def simulate(args: argparse.Namespace, cfg: FederationConfig, opts: ModeOptions,
             plan: RunPlan) -> int:
    from server_hub.simulation.launch import simulate_inproc, simulate_mqtt

    if args.transport == "mqtt" and args.algorithm == "gkt":
        result = simulate_mqtt(cfg, args.codec, not args.no_progress, args.round_deadline,
                               opts, monitor_options(args), plan=plan,
                               device_data=args.device_data,
                               deliver_models=not args.no_model_delivery)
    else:
        if args.transport == "mqtt":
            print(f"note: {args.algorithm} runs in-process (no network transport for it)")
        try:
            result = simulate_inproc(cfg, args.algorithm, not args.no_progress, opts,
                                     plan, args.device_data)
        except ValueError as err:  # own folders without --test-data, nothing usable
            print(f"gkt-hub: error: {err}", file=sys.stderr)
            return EXIT_BAD_ARGS
    if args.json:
        result.write_json(args.json)
        print(f"wrote {args.json}")
    return EXIT_OK

if __name__ == "__main__":
    sys.exit(main())
