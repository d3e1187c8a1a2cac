"""Typed options of a hub run, built once at the command line (server_hub/cli/) and passed
down explicitly: nothing below the CLI sees an ``argparse.Namespace``."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_runtime.device.throttle import DeviceSpeed
from server_hub.async_mode.rules import AsyncConfig
from server_hub.run.plan import RunPlan
from server_hub.service import ServiceConfig


@dataclass(frozen=True)
class ModeOptions:
    """Sync rounds or async mode, and (simulate only) the simulated devices' speeds."""

    mode: str = "sync"
    acfg: AsyncConfig | None = None  # set when mode is async
    fleet: list[DeviceSpeed] = field(default_factory=list)  # simulate only; empty: as is


@dataclass(frozen=True)
class BrokerOptions:
    """Join the broker at ``url``, or start Mosquitto on ``listen:port`` (with the state
    dir's access rules)."""

    url: str | None = None
    username: str | None = None  # the hub's login on a joined broker
    password: str | None = None
    listen: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    tls_port: int = 8883
    tls_hosts: tuple[str, ...] = ()
    insecure: bool = False


@dataclass(frozen=True)
class MonitorOptions:
    """Prometheus metrics and the status page, each off unless a port is given."""

    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    status_port: int | None = None
    status_host: str = "127.0.0.1"
    linger: float = 0.0  # seconds to keep serving after the last round

    @property
    def enabled(self) -> bool:
        return self.metrics_port is not None or self.status_port is not None


@dataclass(frozen=True)
class WorkerOptions:
    """K hub workers training one server model with DDP (server_hub/workers/)."""

    workers: int = 1
    share_group: str | None = None  # None: derived from the hub's broker password
    threads: int = 0  # torch CPU threads per worker (0 = cores / workers)
    trace_dir: str | None = None


@dataclass(frozen=True)
class HubOptions:
    """Everything a hub run needs besides the federation (FederationConfig)."""

    service: ServiceConfig
    mode: ModeOptions = field(default_factory=ModeOptions)
    monitor: MonitorOptions = field(default_factory=MonitorOptions)
    workers: WorkerOptions = field(default_factory=WorkerOptions)
    progress: bool = True  # a progress bar (else only the rows of the round table)
    signals: bool = True  # SIGTERM/SIGINT stop the hub cleanly (a restart resumes)
    spill_features: bool = True  # received features to STATE/features (bounded memory)
    deliver_models: bool = True  # at the end each device gets its composed model ([export])
    new_run: bool = False  # serve: the state dir's run moves to STATE/runs/RUN_ID first
    # what every device adopts (built once at the CLI); the state dir keeps its run id.
    # None: the academic dataset's test split, no run spec announced (tests, benchmarks)
    plan: RunPlan | None = None
