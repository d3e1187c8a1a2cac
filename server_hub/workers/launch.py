"""Start hub workers: K on this machine (``gkt-hub serve --workers K``) or one per torchrun
process on several machines::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank N --master-addr HOST0 \\
        --master-port 29500 -m server_hub.workers.launch --broker mqtt://BROKER:1883 \\
        --state-dir /var/lib/gkt-hub --min-devices 8 ...   # the gkt-hub serve options

See docs/scaling.md. Every worker loads the test split (it evaluates a share of the
devices); rank 0 announces rounds and writes checkpoints to its --state-dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from server_hub.simulation.inproc import FederationConfig

log = logging.getLogger("gkt.hub")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several hub workers (docs/scaling.md)")
    g.add_argument("--workers", type=_positive, default=1,
                   help="hub processes on this machine training one server model with DDP "
                        "(1 = a single process, no torch.distributed)")
    g.add_argument("--share-group", default=None,
                   help="MQTT v5 shared-subscription group the workers split uploads in "
                        "(default: derived from the hub's broker password, so a device "
                        "cannot join it; 'gkt-hub' on a broker without logins)")
    g.add_argument("--worker-threads", type=int, default=0,
                   help="torch CPU threads per worker (0 = cores / workers on this machine)")
    g.add_argument("--broker-user", help="MQTT user name of the hub (every worker) on a "
                                         "--broker that needs a login (password: "
                                         "$GKT_BROKER_PASSWORD)")
    g.add_argument("--trace-dir", help="write the (device, sample id) each worker trained, "
                                       "per epoch, as JSON lines here (an audit)")


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def run_worker(args: argparse.Namespace, cfg: FederationConfig, url: str,
               login: tuple[str | None, str | None] = (None, None),
               init_method: str = "env://", rank: int | None = None,
               world: int | None = None) -> int:
    """One worker: join the process group, connect to the broker, serve rounds."""
    import torch

    from edge_runtime.learning.data import DataConfig, load_split, make_loader
    from edge_runtime.mqtt.link import LinkConfig, MqttLink
    from server_hub.hub import Hub
    from server_hub.monitoring.endpoints import MonitoringError, start_monitoring
    from server_hub.results import HEADER, format_row
    from server_hub.service import ServiceConfig
    from server_hub.trainer import pick_device
    from server_hub.workers.distributed import backend_for, broadcast, init_group, local_rank
    from server_hub.workers.service import WorkerConfig, WorkerService, share_group_for

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world or 1))
    torch.set_num_threads(args.worker_threads or max(1, (os.cpu_count() or 1) // per_node))
    device = pick_device(cfg.server.device)
    server_cfg = cfg.server
    if device.type == "cuda":
        lr = int(os.environ.get("LOCAL_RANK", rank or 0))
        torch.cuda.set_device(lr)
        server_cfg = replace(server_cfg, device=f"cuda:{lr}")
    rank, world = init_group(backend_for(device), init_method, rank, world)
    plain = DataConfig(cfg.data.dataset, cfg.data.root, cfg.data.image_size, augment=False)
    try:
        test_loader = make_loader(load_split(plain, train=False).dataset, 256, shuffle=False)
    except FileNotFoundError as err:  # every worker evaluates a share of the devices
        log.error("rank %d: %s", rank, err)
        return 2
    link = MqttLink(LinkConfig(url, client_id=f"gkt-hub-{rank}", username=login[0],
                               password=login[1], max_packet_size=args.max_payload + 4096))
    monitor_on = args.metrics_port is not None or args.status_port is not None
    monitor = None
    try:
        link.connect()
        features = Path(args.state_dir) / "features" / f"rank-{rank}"  # its own spill files
        svc = WorkerService(
            link, Hub(cfg.data.num_classes, server_cfg, cfg.seed, feature_dir=features),
            ServiceConfig(args.state_dir, rounds=cfg.rounds, min_devices=args.min_devices,
                          round_deadline=args.round_deadline, start_timeout=args.start_timeout,
                          max_payload=args.max_payload + 4096),
            cfg.data, test_loader,
            WorkerConfig(args.share_group or share_group_for(login[1]), seed=cfg.seed,
                         trace_dir=args.trace_dir,
                         monitor=monitor_on),
            on_round=lambda rec: print(format_row(rec), flush=True))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: svc.stop())
        ok = True
        if monitor_on and rank == 0:  # rank 0 serves the whole hub's figures
            try:
                monitor = start_monitoring(args, svc, svc.fleet)
            except MonitoringError as err:
                log.error("%s", err)
                ok = False
        if monitor_on and not broadcast(ok):
            return 2  # every worker stops, not only rank 0
        if rank == 0:
            print(f"{world} hub workers (rank {rank} local {local_rank()}), "
                  f"{torch.get_num_threads()} threads each, broker {url}", flush=True)
            print(HEADER, flush=True)
        code = svc.run()
        if monitor:
            monitor.linger(args.monitor_linger, svc)
        return code
    finally:
        if monitor:
            monitor.close()
        link.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _spawned(index: int, args: argparse.Namespace, cfg: FederationConfig, url: str,
             logins: list[tuple], init_method: str, world: int) -> None:
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s rank{index} %(name)s: %(message)s")
    sys.exit(run_worker(args, cfg, url, logins[index], init_method, index, world))


def serve_workers(args: argparse.Namespace, cfg: FederationConfig) -> int:
    """``gkt-hub serve --workers K``: the managed (or given) broker, K spawned workers."""
    import torch.multiprocessing as mp

    from server_hub.broker.mosquitto import free_port
    from server_hub.cli.serve import BrokerSetupError, open_broker

    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    try:  # the managed broker has the same access rules as one hub
        broker, url, access = open_broker(args, state)
    except BrokerSetupError as err:
        log.error("%s", err)
        return err.exit_code
    logins = [(access.username, access.password)] * args.workers
    if broker is not None and access.username:  # client id = user name: one user each
        from server_hub.broker.enrol import ensure_hub_users

        names = [f"{access.username}-{r}" for r in range(args.workers)]
        ensure_hub_users(state, [u for n in names for u in (n, f"{n}-scan")])
        logins = [(n, access.password) for n in names]
    init_method = f"tcp://127.0.0.1:{free_port()}"
    forwarded: list[int] = []
    try:
        ctx = mp.start_processes(_spawned, nprocs=args.workers, join=False,
                                 args=(args, cfg, url, logins, init_method, args.workers))

        def forward(sig: int, _frame: object) -> None:  # each worker stops cleanly
            forwarded.append(sig)
            for proc in ctx.processes:
                if proc.is_alive():
                    os.kill(proc.pid, sig)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        while not ctx.join():
            pass
        return 0
    except mp.ProcessExitedException as err:
        if err.signal_name in {signal.Signals(s).name for s in forwarded}:
            # the signal we passed on reached a worker already on its way out
            log.info("workers stopped (%s)", err.signal_name)
            return 0
        log.error("%s", err)
        return err.exit_code if err.exit_code and err.exit_code > 0 else 1
    finally:
        if broker:
            broker.stop()


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: the gkt-hub serve options; --broker is required (no managed one)."""
    from server_hub.cli.main import build_parser, federation_config

    args = build_parser().parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    if args.broker is None:
        print("server_hub.workers.launch: error: --broker URL is required under torchrun",
              file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    return run_worker(args, federation_config(args), args.broker, _login(args))


def _login(args: argparse.Namespace) -> tuple[str | None, str | None]:
    return args.broker_user, os.environ.get("GKT_BROKER_PASSWORD") if args.broker_user else None


if __name__ == "__main__":
    sys.exit(main())
