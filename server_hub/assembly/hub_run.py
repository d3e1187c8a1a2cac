"""The one way a hub is put together and run: `gkt-hub serve` (cli/serve.py), each hub worker
(workers/launch.py) and `gkt-hub simulate --transport mqtt` (simulation/launch.py) all call
``run_hub`` with their typed options.

``run_hub`` loads the test split, connects the MQTT link, builds the service (sync, async or
a hub worker), installs the signal handlers, shows progress, starts monitoring, runs, and
closes what it opened. ``open_broker`` starts (or joins) the broker first.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from edge_runtime.learning.data import DataConfig, load_split, make_loader
from edge_runtime.mqtt.link import LinkConfig, MqttLink
from edge_runtime.protocol.limits import max_packet_size
from edge_runtime.protocol.run_spec import RunSpec, decode_run_spec
from server_hub.assembly.exit_codes import EXIT_BAD_ARGS, EXIT_BROKER
from server_hub.assembly.options import BrokerOptions, HubOptions
from server_hub.broker.access import AccessConfig, AccessError, BrokerAccess, broker_access
from server_hub.broker.mosquitto import BrokerConfig, ManagedBroker
from server_hub.delivery.models import model_delivery
from server_hub.hub import Hub
from server_hub.hub_status import HubStatus
from server_hub.monitoring.endpoints import MonitoringError, start_monitoring
from server_hub.monitoring.results import HEADER, RoundRecord, RunResult, format_row
from server_hub.run.spec_store import RunSpecConflict, settle_run_spec
from server_hub.simulation.inproc import FederationConfig
from server_hub.trainer import ServerTrainConfig

log = logging.getLogger("gkt.hub")


class BrokerSetupError(RuntimeError):
    """The broker could not be started or joined; ``exit_code`` is the program's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def open_broker(opts: BrokerOptions, state: Path,
                max_payload: int) -> tuple[ManagedBroker | None, str, BrokerAccess]:
    """(managed broker or None, URL for the hub, hub login): the broker at ``opts.url``, or
    a started Mosquitto with the state dir's access rules. BrokerSetupError carries the
    exit code."""
    if opts.url is not None:
        return None, opts.url, BrokerAccess(username=opts.username, password=opts.password)
    try:
        access = broker_access(AccessConfig(str(state), opts.listen, opts.tls, opts.tls_port,
                                            opts.tls_hosts, opts.insecure))
    except AccessError as err:
        raise BrokerSetupError(str(err), EXIT_BAD_ARGS) from None
    bcfg = BrokerConfig(str(state / "broker"), host=opts.listen, port=opts.port,
                        max_packet_size=max_packet_size(max_payload), **access.broker_fields)
    broker = ManagedBroker(bcfg, supervise=True)
    try:
        broker.start()
    except (FileNotFoundError, RuntimeError) as err:
        raise BrokerSetupError(str(err), EXIT_BROKER) from None
    url = f"mqtt://127.0.0.1:{opts.port}" if opts.listen == "0.0.0.0" else broker.url
    return broker, url, access


@dataclass(frozen=True)
class HubOutcome:
    """How a hub run ended."""

    code: int  # the program's exit code (server_hub/exit_codes.py)
    status: HubStatus | None = None  # the service's last status (None: it never started)
    last: RoundRecord | None = None  # the last round this process recorded


@dataclass(frozen=True)
class Rank:
    """This process's place among hub workers (server_hub/workers/launch.py)."""

    rank: int
    world: int
    server: ServerTrainConfig  # its torch device (cuda:LOCAL_RANK)


def run_hub(fed: FederationConfig, opts: HubOptions, url: str,
            login: tuple[str | None, str | None] = (None, None),
            on_round: Callable[[RoundRecord], None] | None = None, desc: str = "gkt-hub",
            worker: Rank | None = None) -> HubOutcome:
    """Run a hub against the broker at ``url`` until its rounds (or updates) are done."""
    where = f"rank {worker.rank}: " if worker else ""
    try:  # every hub worker evaluates a share of the devices
        spec = _settled_spec(opts, worker)
        if opts.plan is not None:
            test_loader = opts.plan.test_loader(fed)
        else:
            plain = DataConfig(fed.data.dataset, fed.data.root, fed.data.image_size,
                               augment=False)
            test_loader = make_loader(load_split(plain, train=False).dataset, 256,
                                      shuffle=False)
    except (RunSpecConflict, FileNotFoundError) as err:
        log.error("%s%s", where, err)
        return HubOutcome(EXIT_BAD_ARGS)
    if spec is not None:
        opts = replace(opts, service=replace(opts.service, run_spec=spec))
        log.info("%srun %s: %d classes, input %dx%d%s", where, spec.run_id, spec.num_classes,
                 spec.preprocess["size"], spec.preprocess["size"],
                 f", dataset {spec.dataset}" if spec.dataset else ", devices' own data")
    link = MqttLink(LinkConfig(url, client_id=f"gkt-hub-{worker.rank}" if worker else "gkt-hub",
                               username=login[0], password=login[1],
                               max_packet_size=max_packet_size(opts.service.max_payload)))
    try:
        link.connect()
    except (ConnectionError, ValueError) as err:
        log.error("%s%s", where, err)
        return HubOutcome(EXIT_BROKER)
    sync = opts.mode.mode == "sync"
    bar = tqdm(total=fed.rounds if sync else None, desc=desc, unit="round",
               disable=None if opts.progress else True, leave=False)  # None: a terminal only
    write = bar.write if opts.progress else (lambda line: print(line, flush=True))
    if worker is None or worker.rank == 0:
        write(HEADER)

    # STATE/run.json, rewritten after every round: the rounds so far, the last per-class
    # report and the run spec (a restarted hub starts the file again from its next round)
    run = RunResult("gkt", spec.dataset or "own", opts.service.min_devices, {},
                    transport="mqtt", run_spec=spec.to_dict()) if spec else None

    def on_record(rec: RoundRecord) -> None:
        write(format_row(rec))
        if run is not None and (worker is None or worker.rank == 0):
            run.rounds.append(rec)
            run.class_report = svc.status().class_report
            run.write_json(Path(opts.service.state_dir) / "run.json")
        bar.set_postfix(acc=f"{rec.test_accuracy:.3f}")
        bar.update(1)
        if on_round:
            on_round(rec)

    svc = _service(fed, opts, link, test_loader, login, worker, on_record,
                   lambda s: bar.set_postfix_str(s, refresh=True))
    test_folder = opts.plan.test_folder if opts.plan else None
    # One hub delivers the models, or rank 0 of hub workers (it writes the checkpoints and
    # holds every device's extractor); devices' replies come on their model topics.
    delivers = opts.deliver_models and (worker is None or worker.rank == 0)
    if delivers and spec and not spec.dataset and not test_folder:
        log.warning("model delivery off: the devices' models are verified on the hub's "
                    "held-out images before they are sent; give --test-data DIR to deliver")
    elif delivers:
        delivery = model_delivery(link, opts.service.state_dir, fed.data.root,
                                  opts.service.max_payload, test_folder)
        if delivery is not None:
            svc.intake.attach_delivery(delivery)
    if opts.signals:
        # a hub worker gets each Ctrl-C twice (from the terminal and passed on by its
        # parent), so only a single hub takes a second one as "stop at once"
        stop_on_signals(svc, second_sigint_forces=worker is None)
    monitor = None
    try:
        ok = True
        if opts.monitor.enabled and (worker is None or worker.rank == 0):
            try:  # hub workers: rank 0 serves the whole hub's figures
                monitor = start_monitoring(opts.monitor, svc, getattr(svc, "fleet", None))
            except MonitoringError as err:
                log.error("%s", err)
                ok = False
        if worker is not None and opts.monitor.enabled:
            from server_hub.workers.distributed import broadcast

            ok = broadcast(ok)  # every worker stops, not only rank 0
        if not ok:
            return HubOutcome(EXIT_BAD_ARGS, svc.status())
        # log lines above the progress bar, not glued to its end (tqdm.write)
        with logging_redirect_tqdm() if opts.progress else contextlib.nullcontext():
            code = svc.run()
        if monitor:
            monitor.linger(opts.monitor.linger, svc)
        return HubOutcome(code, svc.status(), run.rounds[-1] if run and run.rounds else None)
    finally:
        if monitor:
            monitor.close()
        bar.close()
        link.close()


def stop_on_signals(svc, second_sigint_forces: bool = True) -> None:
    """SIGTERM and Ctrl-C end the run after the current step (a restart resumes); with
    ``second_sigint_forces`` a second Ctrl-C raises KeyboardInterrupt at once."""
    seen: list[int] = []  # signals taken so far (an append needs no lock)

    def on_signal(sig: int, _frame) -> None:
        # A handler runs on the main thread between two bytecodes, maybe while that thread
        # holds a lock svc.stop() takes (the stop Event's own): stopping here deadlocked a
        # hub worker that got Ctrl-C and then its parent's SIGTERM as it set that Event.
        # So no lock is taken here: a thread does the stop.
        again = bool(seen)
        seen.append(sig)
        if sig == signal.SIGINT and again and second_sigint_forces:
            raise KeyboardInterrupt
        if not again:
            log.warning("%s: stopping after the current step; a restart resumes%s",
                        signal.Signals(sig).name, " (Ctrl-C again to stop at once)"
                        if sig == signal.SIGINT and second_sigint_forces else "")
        threading.Thread(target=svc.stop, name="stop", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _service(fed: FederationConfig, opts: HubOptions, link: MqttLink, test_loader,
             login: tuple, worker: Rank | None, on_round, on_status):
    """The synchronous HubService, the asynchronous one, or a hub worker."""
    features = Path(opts.service.state_dir) / "features" if opts.spill_features else None
    if worker is not None and features is not None:
        features = features / f"rank-{worker.rank}"  # its own spill files
    spec = opts.service.run_spec
    # workers hold no maps across rounds (their logits name no feature epoch)
    held = None if worker is not None else Path(opts.service.state_dir) / "held"
    hub = Hub(spec.num_classes if spec else fed.data.num_classes,
              worker.server if worker else fed.server, fed.seed, feature_dir=features,
              held_dir=held)
    if worker is not None:
        from server_hub.workers.service import WorkerConfig, WorkerService, share_group_for

        w = opts.workers
        wcfg = WorkerConfig(w.share_group or share_group_for(login[1]), seed=fed.seed,
                            trace_dir=w.trace_dir, monitor=opts.monitor.enabled)
        return WorkerService(link, hub, opts.service, fed.data, test_loader, wcfg, on_round,
                             on_status)
    if opts.mode.mode == "async":
        from server_hub.async_mode.service import AsyncHubService

        return AsyncHubService(link, hub, opts.service, opts.mode.acfg, fed.data, test_loader,
                               on_round, on_status)
    from server_hub.service import HubService

    return HubService(link, hub, opts.service, fed.data, test_loader, on_round, on_status)


def _settled_spec(opts: HubOptions, worker: Rank | None) -> RunSpec | None:
    """The plan's spec with the state dir's run id (hub workers: rank 0 settles it and
    every rank announces or checks that one). RunSpecConflict: another run is saved."""
    if opts.plan is None:
        return None
    if worker is None:
        return settle_run_spec(opts.service.state_dir, opts.plan.spec)
    from server_hub.workers.distributed import broadcast

    settled = None
    if worker.rank == 0:
        try:
            settled = settle_run_spec(opts.service.state_dir, opts.plan.spec).to_json()
        except RunSpecConflict as err:
            log.error("%s", err)
    settled = broadcast(settled)
    if settled is None:
        raise RunSpecConflict("rank 0 could not settle the run spec")
    return decode_run_spec(settled)
