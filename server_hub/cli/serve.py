"""`gkt-hub serve`: a managed (or joined) broker, the hub service, live progress.

Exit codes: 0 all rounds done, 2 bad arguments, 3 no devices before a deadline,
4 broker unreachable or could not start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from tqdm import tqdm

from edge_runtime.learning.data import DataConfig, load_split, make_loader
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from server_hub.broker.access import AccessConfig, AccessError, BrokerAccess, broker_access
from server_hub.broker.mosquitto import BrokerConfig, ManagedBroker
from server_hub.cli.mode_options import hub_service
from server_hub.hub import Hub
from server_hub.monitoring.endpoints import MonitoringError, start_monitoring
from server_hub.results import HEADER, RoundRecord, format_row
from server_hub.service import ServiceConfig
from server_hub.simulation.inproc import FederationConfig

log = logging.getLogger("gkt.hub")
EXIT_BROKER = 4


class BrokerSetupError(RuntimeError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def open_broker(args: argparse.Namespace,
                state: Path) -> tuple[ManagedBroker | None, str, BrokerAccess]:
    """(managed broker or None, URL for the hub, hub login): the broker at --broker (login
    --broker-user, password from $GKT_BROKER_PASSWORD), or a started Mosquitto with the
    state dir's access rules. BrokerSetupError carries the exit code."""
    if args.broker is not None:
        user = getattr(args, "broker_user", None)
        return None, args.broker, BrokerAccess(
            username=user, password=os.environ.get("GKT_BROKER_PASSWORD") if user else None)
    try:
        access = broker_access(AccessConfig(str(state), args.listen, args.tls, args.tls_port,
                                            tuple(args.tls_host), args.insecure))
    except AccessError as err:
        raise BrokerSetupError(str(err), 2) from None
    bcfg = BrokerConfig(str(state / "broker"), host=args.listen, port=args.port,
                        max_packet_size=args.max_payload + 4096, **access.broker_fields)
    broker = ManagedBroker(bcfg, supervise=True)
    try:
        broker.start()
    except (FileNotFoundError, RuntimeError) as err:
        raise BrokerSetupError(str(err), EXIT_BROKER) from None
    url = f"mqtt://127.0.0.1:{args.port}" if args.listen == "0.0.0.0" else broker.url
    return broker, url, access


def serve(args: argparse.Namespace, cfg: FederationConfig) -> int:
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    try:
        broker, url, access = open_broker(args, state)
    except BrokerSetupError as err:
        log.error("%s", err)
        return err.exit_code
    plain = DataConfig(cfg.data.dataset, cfg.data.root, cfg.data.image_size, augment=False)
    try:
        test_loader = make_loader(load_split(plain, train=False).dataset, 256, shuffle=False)
    except FileNotFoundError as err:
        log.error("%s", err)
        return 2
    link = MqttLink(LinkConfig(url, client_id="gkt-hub", username=access.username,
                               password=access.password,
                               max_packet_size=args.max_payload + 4096))
    try:
        link.connect()
    except (ConnectionError, ValueError) as err:
        log.error("%s", err)
        if broker:
            broker.stop()
        return EXIT_BROKER
    bar = tqdm(total=cfg.rounds, desc="gkt-hub", unit="round", disable=args.no_progress)
    bar.write(HEADER)

    def on_round(rec: RoundRecord) -> None:
        bar.write(format_row(rec))
        bar.update(1)

    svc = hub_service(getattr(args, "mode_options", None), link,
                      Hub(cfg.data.num_classes, cfg.server, cfg.seed,
                          feature_dir=state / "features", held_dir=state / "held"),
                      ServiceConfig(str(state), rounds=cfg.rounds,
                                    min_devices=args.min_devices,
                                    round_deadline=args.round_deadline,
                                    start_timeout=args.start_timeout,
                                    max_payload=args.max_payload + 4096),
                      cfg.data, test_loader, on_round,
                      on_status=lambda s: bar.set_postfix_str(s, refresh=True))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: svc.stop())
    monitor = None
    try:
        monitor = start_monitoring(args, svc)
        code = svc.run()
        monitor.linger(getattr(args, "monitor_linger", 0.0), svc)
        return code
    except MonitoringError as err:
        log.error("%s", err)
        return 2
    finally:
        if monitor:
            monitor.close()
        bar.close()
        link.close()
        if broker:
            broker.stop()
