"""Start hub workers: K on this machine (``gkt-hub serve --workers K``) or one per torchrun
process on several machines::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank N --master-addr HOST0 \\
        --master-port 29500 -m server_hub.workers.launch --broker mqtt://BROKER:1883 \\
        --state-dir /var/lib/gkt-hub --min-devices 8 ...   # the gkt-hub serve options

See docs/scaling.md. Every worker loads the test split (it evaluates a share of the
devices); rank 0 announces rounds and writes checkpoints to its --state-dir.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from server_hub.assembly.exit_codes import EXIT_BAD_ARGS
from server_hub.assembly.options import BrokerOptions, HubOptions
from server_hub.simulation.inproc import FederationConfig

log = logging.getLogger("gkt.hub")


def run_worker(fed: FederationConfig, opts: HubOptions, url: str,
               login: tuple[str | None, str | None] = (None, None),
               init_method: str = "env://", rank: int | None = None,
               world: int | None = None) -> int:
    """One worker: join the process group, then run the hub's round loop as a worker."""
    import torch

    from server_hub.assembly.hub_run import Rank, run_hub
    from server_hub.trainer import pick_device
    from server_hub.workers.distributed import backend_for, init_group, local_rank

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world or 1))
    torch.set_num_threads(opts.workers.threads or max(1, (os.cpu_count() or 1) // per_node))
    device = pick_device(fed.server.device)
    server_cfg = fed.server
    if device.type == "cuda":
        lr = int(os.environ.get("LOCAL_RANK", rank or 0))
        torch.cuda.set_device(lr)
        server_cfg = replace(server_cfg, device=f"cuda:{lr}")
    rank, world = init_group(backend_for(device), init_method, rank, world)
    if rank == 0:
        print(f"{world} hub workers (rank {rank} local {local_rank()}), "
              f"{torch.get_num_threads()} threads each, broker {url}", flush=True)
    try:
        # one line per round on stdout: K progress bars would garble each other
        return run_hub(fed, replace(opts, progress=False), url, login,
                       worker=Rank(rank, world, server_cfg)).code
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _spawned(index: int, fed: FederationConfig, opts: HubOptions, url: str, logins: list[tuple],
             init_method: str, world: int) -> None:
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s rank{index} %(name)s: %(message)s")
    sys.exit(run_worker(fed, opts, url, logins[index], init_method, index, world))


def serve_workers(fed: FederationConfig, opts: HubOptions, broker_opts: BrokerOptions) -> int:
    """``gkt-hub serve --workers K``: the managed (or given) broker, K spawned workers."""
    import torch.multiprocessing as mp

    from server_hub.assembly.hub_run import BrokerSetupError, open_broker
    from server_hub.broker.mosquitto import free_port

    state = Path(opts.service.state_dir)
    try:  # the managed broker has the same access rules as one hub
        broker, url, access = open_broker(broker_opts, state, opts.service.max_payload)
    except BrokerSetupError as err:
        log.error("%s", err)
        return err.exit_code
    workers = opts.workers.workers
    logins = [(access.username, access.password)] * workers
    if broker is not None and access.username:  # client id = user name: one user each
        from server_hub.broker.enrol import ensure_hub_users

        names = [f"{access.username}-{r}" for r in range(workers)]
        ensure_hub_users(state, [u for n in names for u in (n, f"{n}-scan")])
        logins = [(n, access.password) for n in names]
    init_method = f"tcp://127.0.0.1:{free_port()}"
    forwarded: list[int] = []
    try:
        # Workers are born ignoring Ctrl-C (a Python started with SIGINT ignored keeps it
        # so): one pressed while a worker still imports would raise KeyboardInterrupt there
        # and leave the other waiting in a collective. The parent turns both signals into
        # SIGTERM, which a worker takes as "stop after this step" once its hub is up.
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            ctx = mp.start_processes(_spawned, nprocs=workers, join=False,
                                     args=(fed, opts, url, logins, init_method, workers))
        finally:
            signal.signal(signal.SIGINT, sigint)

        def forward(sig: int, _frame: object) -> None:  # each worker stops cleanly
            forwarded.append(signal.SIGTERM)
            for proc in ctx.processes:
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)

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
    from server_hub.cli.main import build_parser, hub_options

    args = build_parser().parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    if args.broker is None:
        print("server_hub.workers.launch: error: --broker URL is required under torchrun",
              file=sys.stderr)
        return EXIT_BAD_ARGS
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    fed, opts, broker_opts = hub_options(args)
    return run_worker(fed, opts, broker_opts.url, (broker_opts.username, broker_opts.password))


if __name__ == "__main__":
    sys.exit(main())
