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

from edge_runtime.mqtt.link import LinkConfig, MqttLink
from server_hub.broker.access import AccessConfig, AccessError, BrokerAccess, broker_access
from server_hub.broker.mosquitto import BrokerConfig, ManagedBroker
from server_hub.cli.mode_options import hub_service
from server_hub.hub import Hub
from server_hub.monitoring.endpoints import MonitoringError, start_monitoring
from server_hub.results import HEADER, RoundRecord, RunResult, format_row
from server_hub.run.spec_store import RunSpecConflict, settle_run_spec
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
    plan = args.run_plan
    try:
        spec = settle_run_spec(state, plan.spec)
        test_loader = plan.test_loader(cfg)
    except (RunSpecConflict, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    log.info("run %s: %d classes, input %dx%d%s", spec.run_id, spec.num_classes,
             spec.preprocess["size"], spec.preprocess["size"],
             f", dataset {spec.dataset}" if spec.dataset else ", devices' own data")
    try:
        broker, url, access = open_broker(args, state)
    except BrokerSetupError as err:
        log.error("%s", err)
        return err.exit_code
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

    # STATE/run.json, rewritten after every round: the rounds so far, the last per-class
    # report and the run spec (a restarted hub starts the file again from its next round)
    run = RunResult("gkt", spec.dataset or "own", args.min_devices, {}, transport="mqtt",
                    run_spec=spec.to_dict())

    def on_round(rec: RoundRecord) -> None:
        bar.write(format_row(rec))
        bar.update(1)
        run.rounds.append(rec)
        run.class_report = getattr(svc, "class_report", None)
        run.write_json(state / "run.json")

    svc = hub_service(getattr(args, "mode_options", None), link,
                      Hub(spec.num_classes, cfg.server, cfg.seed,
                          feature_dir=state / "features"),
                      ServiceConfig(str(state), rounds=cfg.rounds,
                                    min_devices=args.min_devices,
                                    round_deadline=args.round_deadline,
                                    start_timeout=args.start_timeout,
                                    max_payload=args.max_payload + 4096, run_spec=spec),
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
