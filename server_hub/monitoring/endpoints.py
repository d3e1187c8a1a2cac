"""Monitoring of a running hub: wiring of the fleet observer, the Prometheus endpoint and
the status page to a hub service, and the text `gkt-hub status` prints.

Both servers are off unless a port is given, and bind to loopback unless told otherwise
(neither has authentication: put a reverse proxy in front to show them on a network).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from server_hub.assembly.options import MonitorOptions
from server_hub.monitoring.snapshot import FleetObserver

log = logging.getLogger("gkt.hub")


@dataclass
class Monitoring:
    """The fleet observer and the servers started for it (metrics, status page)."""

    fleet: FleetObserver
    servers: list = field(default_factory=list)

    def close(self) -> None:
        for s in self.servers:
            s.close()

    def linger(self, seconds: float, service) -> None:
        """Keep serving the final figures ``seconds`` longer, unless the service is stopped."""
        if self.servers and seconds > 0:
            log.info("serving the final metrics and status for %.0f s", seconds)
            service.wait_stopped(seconds)


class MonitoringError(RuntimeError):
    """A metrics or status port that cannot be served (taken, or a bad address)."""


def start_monitoring(opts: MonitorOptions, service,
                     fleet: FleetObserver | None = None) -> Monitoring:
    """Attach the observers to ``service`` and start the servers asked for; ``fleet``: one
    the service has already (hub workers' rank 0 merges the other workers' into it)."""
    mon = Monitoring(fleet or FleetObserver())
    if fleet is None:
        service.add_observer(mon.fleet)
    listeners = [mon.fleet.on_round]
    try:
        if opts.metrics_port is not None:
            from server_hub.monitoring.metrics import (
                HubMetrics,  # prometheus_client: the [hub] extra
            )

            metrics = HubMetrics(service, mon.fleet)
            listeners.append(metrics.on_round)
            port = metrics.serve(opts.metrics_port, opts.metrics_host)
            mon.servers.append(metrics)
            log.info("metrics on http://%s:%d/metrics", opts.metrics_host, port)
        if opts.status_port is not None:
            from server_hub.monitoring.status_page import StatusServer

            status = StatusServer(lambda: mon.fleet.snapshot(service), opts.status_port,
                                  opts.status_host)
            mon.servers.append(status)
            log.info("status page on %s", status.url)
    except OSError as err:
        mon.close()
        raise MonitoringError(f"cannot serve metrics or the status page: {err}") from err
    chained = service.on_round  # every service kind (sync, async, workers) reports rounds here

    def on_round(rec) -> None:
        for listener in listeners:
            listener(rec)
        if chained:
            chained(rec)

    service.on_round = on_round
    return mon


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_status(s: dict) -> str:
    last = s["history"][-1] if s["history"] else {}
    is_async = s.get("mode") == "async"  # no rounds: uploads merged, per device staleness
    head = (f"async: {s['version']}/{s['max_updates'] or '-'} uploads merged ({s['phase']}), "
            f"{s['rounds_completed']} evaluations" if is_async else
            f"round {s['round']}/{s['rounds']} ({s['phase']}), {s['rounds_completed']} "
            f"completed")
    where = f"{'update':>6} {'age':>4} {'weight':>6}" if is_async else f"{'round':>5}"
    w = 18 if is_async else 12  # "waiting for logits"
    lines = [f"{head}; devices {s['devices_active']} active of {s['devices_known']} known",
             f"received {s['bytes_received'] / 1e6:.2f} MB, sent {s['bytes_sent'] / 1e6:.2f} MB, "
             f"{s['samples_received']} samples; test accuracy "
             f"{_num(last.get('test_accuracy'), '.4f')}",
             "rejected: " + (", ".join(f"{k} {v}" for k, v in sorted(s["rejected"].items()))
                             or "none"), "",
             f"{'device':<16} {'state':<{w}} {'samples':>7} {where} "
             f"{'up MB':>8} {'train s':>7} {'own acc':>7} {'seen':>6}"]
    for d in s["devices"]:
        at = (f"{_num(d.get('update'), 'd'):>6} {_num(d.get('staleness'), 'd'):>4} "
              f"{_num(d.get('weight'), '.3f'):>6}" if is_async else f"{d['last_round']:>5}")
        lines.append(f"{d['id']:<16} {d['state']:<{w}} "
                     f"{_num(d.get('samples'), '.0f'):>7} {at} {d['bytes_up'] / 1e6:>8.2f} "
                     f"{_num(d.get('train_seconds'), '.2f'):>7} "
                     f"{_num(d.get('edge_accuracy'), '.3f'):>7} {d['last_seen_s']:>5.0f}s")
    if s["history"] and is_async:
        lines += ["", " eval  updates  test acc  device acc  elapsed"]
        lines += [f"{r['round']:>5}  {_num(r.get('updates'), 'd'):>7}  "
                  f"{r['test_accuracy']:>8.4f}  {_num(r.get('edge_accuracy'), '.4f'):>10}  "
                  f"{_num(r.get('elapsed'), '.1f'):>7}" for r in s["history"][-20:]]
    elif s["history"]:
        lines += ["", "round  test acc  device acc  seconds"]
        lines += [f"{r['round']:>5}  {r['test_accuracy']:>8.4f}  "
                  f"{_num(r.get('edge_accuracy'), '.4f'):>10}  {r['seconds']:>7.1f}"
                  for r in s["history"][-20:]]
    return "\n".join(lines)
